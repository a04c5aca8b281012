"""What every command prints with: tables, sizes, and errors on stderr (exit 2)."""

from __future__ import annotations

import sys


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError

def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)

def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
