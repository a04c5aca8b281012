"""The ``peftkit`` command line: the only place that parses arguments or prints.

    parser.py     every command's options
    run_config.py train --config FILE: a YAML or JSON file of options, under the flags
    training.py   demo, train (the method config, the doctor's pre-flight, the summary)
    models.py     doctor, merge, export, info, generate, compare
    serve.py      serve: a GGUF model and its LoRA adapters behind llama.cpp's OpenAI-compatible server
    output.py     tables, sizes and errors
"""

from __future__ import annotations

import sys
import warnings

from .output import _fail
from .parser import build_parser
from .run_config import ConfigError, parse_args


def _plain_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line for the terminal ("warning: left out 2 of 22 examples ..."),
    without the source path and code line Python adds for programmers."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _plain_warning
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(build_parser(), argv)
    except ConfigError as e:  # before anything is loaded or written
        return _fail(str(e))
    args.argv = argv  # train --nproc runs the same command again on every rank
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
