"""`rlhf-ext` command line. Each subcommand lives in its own module under rlhf_ext/commands/ with
`register(subparsers)`, which adds its parser and sets `func`; modules are imported only when listed
here, so `rlhf-ext env` stays fast."""

import argparse
import importlib
import sys

# subcommand name -> module defining register(subparsers)
COMMANDS = {
    "env": "rlhf_ext.commands.env",
    "bench": "rlhf_ext.commands.bench",
    # ---- train ----
    "train": "rlhf_ext.commands.train",
    # ---- demo ----
    "demo": "rlhf_ext.commands.demo",
    # ---- label ----
    "label": "rlhf_ext.commands.label",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-ext", description="RLHF for Hugging Face Transformers with fused kernels."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in COMMANDS.values():
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
