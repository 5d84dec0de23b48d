"""`python -m torch_tpu_estimator inspect PATH`: what a checkpoint or an export holds.

PATH is a checkpoint file or directory, a model_dir (its latest checkpoint), an export
directory, or an export_dir_base (its newest export). The arguments are parsed before torch is
imported, so `--help` and a mistyped command answer at once.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_tpu_estimator",
                                     description="Tools for torch_tpu_estimator's files.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="print a checkpoint's or an export's "
                                  "signature, step and variables")
    inspect.add_argument("path", help="a checkpoint file, a model_dir, an export directory or "
                                      "an export_dir_base")
    args = parser.parse_args(argv)
    from .describe import describe

    try:
        lines = describe(args.path)
    except (ValueError, OSError, RuntimeError, KeyError, IndexError, TypeError, EOFError) as error:
        print(f"inspect: {args.path} is not a checkpoint, a model_dir or an export: "
              f"{' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0
