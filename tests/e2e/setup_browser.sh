#!/usr/bin/env bash
# Installs what tests/e2e needs, idempotently: Debian's chromium and the pinned Playwright for Python
# (its wheel ships the driver; no browser download happens -- the tests launch /usr/bin/chromium).
# Run as root (or with sudo) inside the project's virtual environment: bash tests/e2e/setup_browser.sh
set -euo pipefail

PLAYWRIGHT_VERSION="1.65.2"

if ! command -v /usr/bin/chromium >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core
fi

PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c "import playwright, importlib.metadata as m; assert m.version('playwright') == '$PLAYWRIGHT_VERSION'" \
        >/dev/null 2>&1; then
    "$PYTHON" -m pip install "playwright==$PLAYWRIGHT_VERSION"
fi

/usr/bin/chromium --version
"$PYTHON" -c "import importlib.metadata as m; print('playwright', m.version('playwright'))"
