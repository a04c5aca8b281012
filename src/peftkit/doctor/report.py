"""What the doctor hands back: ``Finding`` (one mistake, with where and how to fix it) and
``DoctorReport`` (the findings, the notes on probes that could not run, and their text and
JSON forms); the ids, the twelve model mistakes (``MISTAKES``, M1-M12) and the findings on
the training data (``DATA_FINDINGS``, D1-D5); plus the few phrase helpers every check writes
its messages with."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

SEVERITIES = ("error", "warning", "info")

MISTAKES: dict[str, str] = {
    "M1": "base weights left trainable",
    "M2": "adapter not zero at init",
    "M3": "missing alpha/r scaling",
    "M4": "LoRA on the wrong layers",
    "M5": "rank too high",
    "M6": "not merged for inference",
    "M7": "soft prompt not at the input embeddings",
    "M8": "adapter without residual",
    "M9": "learning rate too low for PEFT",
    "M10": "checkpoint holds the whole model",
    "M11": "prefix attention mask not extended",
    "M12": "gradients in the wrong places",
}

# What the batch, the tokenizer and the recorded chat template show: the model is set up
# right, but what it is trained on (or served with) is not what was meant.
DATA_FINDINGS: dict[str, str] = {
    "D1": "no label to learn from",
    "D2": "labels on padding",
    "D3": "loss on user or system tokens",
    "D4": "no EOS in the labels",
    "D5": "chat template differs from the recorded one",
}

_FAMILIES = (MISTAKES, DATA_FINDINGS)  # in report order: M1-M12, then D1-D5


def title(mistake: str) -> str:
    """What an id stands for: 'rank too high' for M5."""
    for family in _FAMILIES:
        if mistake in family:
            return family[mistake]
    raise ValueError(f"unknown mistake id {mistake!r}; ids are {[i for f in _FAMILIES for i in f]}.")


def mistake_order(mistake: str) -> int:
    """Where an id sorts: by its number within its family (M10 after M9), the families in
    order (D1 after M12)."""
    offset = 0
    for family in _FAMILIES:
        if mistake in family:
            return offset + int(mistake[1:])
        offset += len(family)
    raise ValueError(f"unknown mistake id {mistake!r}.")


@dataclass(frozen=True)
class Finding:
    """One mistake found in the model.

    ``id`` is "M1" .. "M12" or "D1" .. "D5"; ``severity`` is "error" (training or inference goes wrong),
    "warning" (it works, badly or wastefully) or "info" (fine now, worth knowing);
    ``where`` names the modules and parameters; ``message`` says what is wrong and why it
    matters; ``fix`` says what to do.
    """

    id: str
    severity: str
    where: str
    message: str
    fix: str

    def __post_init__(self) -> None:
        title(self.id)  # an unknown id is a ValueError
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}.")


@dataclass
class DoctorReport:
    """What ``doctor`` found: ``findings`` (ordered by id) and ``notes`` (checks that could
    not run, and why)."""

    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no finding is an error."""
        return not self.errors

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def ids(self, *severities: str) -> set[str]:
        """The ids found, optionally only those of the given severities."""
        return {f.id for f in self.findings if not severities or f.severity in severities}

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "findings": [asdict(f) for f in self.findings], "notes": list(self.notes)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> DoctorReport:
        data = json.loads(text)
        return cls([Finding(**f) for f in data["findings"]], list(data.get("notes", [])))

    def __str__(self) -> str:
        counts = [_count(len([f for f in self.findings if f.severity == s]), s) for s in SEVERITIES]
        lines = [f"peftkit doctor: {', '.join(counts)}" + ("" if self.ok else "  (not ok)")]
        if not self.findings:
            lines.append("  no mistake found among M1-M12 and D1-D5.")
        else:
            lines += _summary_table(self.findings)
            for f in self.findings:
                lines += ["", f"{f.id} {f.severity}: {title(f.id)}"]
                lines += _wrapped("where", f.where) + _wrapped("problem", f.message) + _wrapped("fix", f.fix)
        if self.notes:
            lines += ["", "notes:"] + [line for note in self.notes for line in _wrapped("-", note, width=2)]
        return "\n".join(lines)


def _count(n: int, severity: str) -> str:
    return f"{n} {severity}" + ("s" if n != 1 and severity != "info" else "")


def _summary_table(findings: list[Finding]) -> list[str]:
    rows = [("id", "severity", "mistake", "where")] + [
        (f.id, f.severity, title(f.id), _shorten(f.where, 60)) for f in findings]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows]


def _wrapped(label: str, text: str, width: int = 8) -> list[str]:
    """``text`` wrapped at 100 columns behind a ``label`` column of ``width``."""
    indent = f"  {label:<{width}} "
    return textwrap.wrap(text, width=100, initial_indent=indent, subsequent_indent=" " * len(indent)) or [indent]


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


# -- phrases the checks' messages share ---------------------------------------------------
def many(n: int, noun: str) -> str:
    """'1 layer', '3 layers'."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def listing(names: Iterable[str], limit: int = 4) -> str:
    """'a, b, c, d and 7 more' — enough to find them, short enough to read."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """The bytes ``tensors`` hold."""
    return sum(t.numel() * t.element_size() for t in tensors)


def human_size(n: float) -> str:
    """Bytes as a person reads them: '512 B', '1.5 MB'."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError
