"""Block-sparse attention for diffusion models: benchmarks, attention fidelity, video generation,
evaluation and a demo, one command each ("sparsediff COMMAND --help" for its options).

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their command runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "bench": ("sparsediff.commands.bench", "time block-sparse attention against dense attention"),
    "probe": ("sparsediff.commands.probe", "attention fidelity of sparse methods on structured or captured Q/K/V"),
    "generate": ("sparsediff.commands.generate", "generate a video with a diffusers pipeline, dense or sparse"),
    "eval": ("sparsediff.commands.eval", "VideoMME / RealWorldQA / RULER / video fidelity / LM quality vs dense"),
    "calibrate": ("sparsediff.eval.calibrate", "per-layer density budgets from a few prompts, as a JSON file"),
    "demo": ("sparsediff.commands.demo", "launch the Gradio demo (dense vs sparse side by side)"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The docstring's first paragraph, whole: its first line alone stops mid-sentence.
    parser = argparse.ArgumentParser(prog="sparsediff", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    # Parse the command name first so only its module gets imported.
    known, rest = parser.parse_known_args(argv)
    if known.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[known.command][0])
    cmd_parser = argparse.ArgumentParser(prog=f"sparsediff {known.command}", description=COMMANDS[known.command][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(rest)
    logging.basicConfig(level=logging.INFO if known.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
