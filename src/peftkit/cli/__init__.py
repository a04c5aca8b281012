"""The ``peftkit`` command line: the only place that parses arguments or prints.

    parser.py     every command's options
    training.py   demo, train (the method config, the doctor's pre-flight, the summary)
    models.py     doctor, merge, export, info, generate, compare
    output.py     tables, sizes and errors
"""

from __future__ import annotations

import sys

from .parser import build_parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
