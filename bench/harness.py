"""What every benchmark here shares: a case in a fresh worker process, its peak memory, the
machine it ran on, and the markdown it is reported in.

A benchmark's parent process starts one worker per case (``python -m bench.<module> --worker
CASE ...``) so that the worker's peak resident memory belongs to that case alone. The worker
prints one marked JSON line (:func:`emit_result`); the parent finds it in the worker's output
(:func:`run_worker`) and turns it, or the way the worker failed, into a row (:func:`worker_row`).
A case that fails becomes an error row; the other cases still run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

RESULT_MARKER = "@@BENCH_RESULT@@ "


# --------------------------------------------------------------------------- in a worker


def import_peftkit():
    """peftkit from this working tree's ``src/``, whether or not it is installed."""
    src = str(REPO_ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    import peftkit

    return peftkit


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (``peftkit.peak_memory``: VmHWM,
    which, unlike ru_maxrss, is not inherited from the process that started this one)."""
    from peftkit.peak_memory import peak_rss_mb as peak

    return peak()


def library_version(case: str) -> str | None:
    """Version of the adapter library a ``peftkit-*`` or ``peft-*`` case used, read from the
    module this process imported; None for a case of neither library."""
    if case.startswith("peftkit-"):
        return getattr(sys.modules.get("peftkit"), "__version__", None)
    if case.startswith("peft-"):
        return sys.modules["peft"].__version__
    return None


def emit_result(measure: Callable[[], dict], identity: dict) -> int:
    """Worker entry point: run ``measure`` and print its result as one marked JSON line. Any
    exception (KeyboardInterrupt and SystemExit too) is printed to stderr and reported as
    ``{**identity, "error": ...}`` instead, so the parent always gets a row."""
    try:
        result = measure()
    except BaseException as exc:
        traceback.print_exc()
        result = {**identity, "error": f"{type(exc).__name__}: {exc}"}
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------- in the parent


def worker_env(threads: int, offline: bool = True) -> dict[str, str]:
    """The environment of a worker process: ``threads`` math threads, ``bench`` importable
    from any working directory and, when ``offline``, local model files only."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if offline:
        env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


@dataclass
class WorkerOutcome:
    """How a worker process ended: its marked result (None if it printed none), its exit
    code (None if it was killed for running past the timeout), its stderr and wall time."""

    result: dict | None
    returncode: int | None
    stderr: str
    wall_s: float

    def stderr_tail(self, lines: int) -> list[str]:
        return self.stderr.strip().splitlines()[-lines:]


def run_worker(module: str, argv: Sequence[str], env: dict[str, str],
               timeout: float | None = None) -> WorkerOutcome:
    """Run ``python -m module *argv`` in a fresh interpreter and read its marked result line."""
    cmd = [sys.executable, "-m", module, *argv]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return WorkerOutcome(None, None, "", time.perf_counter() - start)
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return WorkerOutcome(json.loads(line[len(RESULT_MARKER):]), proc.returncode, proc.stderr, wall)
    return WorkerOutcome(None, proc.returncode, proc.stderr, wall)


def worker_row(outcome: WorkerOutcome, identity: dict, timeout: float | None) -> dict:
    """The row for one worker run: its result with ``wall_s``, or an error row that names
    ``identity`` (case, seed ...) and says how the worker ended."""
    if outcome.result is not None:
        return {**outcome.result, "wall_s": outcome.wall_s}
    if outcome.returncode is None:
        return {**identity, "error": f"timed out after {timeout} s", "wall_s": outcome.wall_s}
    tail = " | ".join(outcome.stderr_tail(3))
    return {**identity, "error": f"subprocess exited with code {outcome.returncode}: {tail}",
            "wall_s": outcome.wall_s}


def load_average() -> float:
    """The 1-minute load average, recorded before each case as ``loadavg_before``."""
    return os.getloadavg()[0]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info(threads: int) -> dict:
    """CPU model and count, the threads each worker uses, platform and library versions."""
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "peft": package_version("peft"),
    }


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def ratio(rows: dict, case: str, reference: str | None, key: str) -> float | None:
    """rows[case][key] / rows[reference][key], or None if either is missing (or zero below)."""
    a, b = rows.get(case, {}), rows.get(reference, {})
    if a.get(key) is None or not b.get(key):
        return None
    return a[key] / b[key]


WALL_CLOCK = {"wall": time.perf_counter}


def time_cases(calls: Mapping[str, Callable[[], object]], rounds: int, warmup: int,
               clocks: Mapping[str, Callable[[], float]] = WALL_CLOCK,
               prepare: Mapping[str, Callable[[], object]] | None = None) -> dict[str, dict[str, list[float]]]:
    """Seconds of each call by each clock, round by round, ``{clock: {case: [s, ...]}}``: every
    case warmed up (``warmup`` untimed calls each), then ``rounds`` rounds of one call per case,
    the order reversed every round, so slow drift in machine load touches every case alike. The
    caller sets the context (``torch.no_grad``, ``torch.inference_mode``) around it.
    ``prepare[case]``, where given, runs untimed before each of that case's calls (cases that
    share one model and differ in the weights loaded into it)."""
    seconds: dict[str, dict[str, list[float]]] = {clock: {case: [] for case in calls} for clock in clocks}
    prepare = prepare or {}
    for case, call in calls.items():
        for _ in range(warmup):
            prepare.get(case, _nothing)()
            call()
    order, read = list(calls), list(clocks.items())
    for round_ in range(rounds):
        for case in (order if round_ % 2 == 0 else order[::-1]):
            prepare.get(case, _nothing)()
            starts = [now() for _, now in read]
            calls[case]()
            ends = [now() for _, now in read]
            for (clock, _), start, end in zip(read, starts, ends):
                seconds[clock][case].append(end - start)
    return seconds


def _nothing() -> None:
    pass


def round_summary(seconds: dict[str, list[float]], ratios: Sequence[tuple[str, str, float | None]]) -> dict:
    """Min and median per case, and each ``(case, reference, target)`` ratio taken round by
    round (case / reference of the same round): its median over the rounds, the ratio of the
    minima, and whether the median is at most ``target`` (None: reported, no target)."""
    rows = [{"case": case, "seconds": s, "min_s": min(s), "median_s": statistics.median(s)}
            for case, s in seconds.items()]
    out = []
    for case, reference, target in ratios:
        found = ratio_of_rounds(seconds[case], seconds[reference])
        out.append({"case": case, "reference": reference, "target": target, **found,
                    "met": None if target is None else found["median_of_rounds"] <= target})
    return {"results": rows, "ratios": out}


def ratio_of_rounds(case: Sequence[float], reference: Sequence[float]) -> dict:
    """One case's seconds over a reference's, round by round (two steps taken moments apart):
    the per-round ratios, their median with its 95% interval (``median_interval``), and the
    ratio of the two minima."""
    per_round = [a / b for a, b in zip(case, reference)]
    return {"median_of_rounds": statistics.median(per_round), "interval": median_interval(per_round),
            "of_min": min(case) / min(reference), "per_round": per_round}


MEDIAN_CONFIDENCE = 0.95


def median_interval(values: Sequence[float], confidence: float = MEDIAN_CONFIDENCE) -> tuple[float, float] | None:
    """A distribution-free ``confidence`` interval for the median of what ``values`` sample
    (independent draws): with x(1) <= ... <= x(n) sorted, [x(k), x(n+1-k)] holds the median
    with probability 1 - 2 P(Binomial(n, 1/2) <= k - 1), and k is the largest for which that
    is at least ``confidence``. It assumes nothing of the noise's shape (this VM's steps slow
    down by 10-40% at random), so it is wide where the noise is. None when there are too few
    values for any k (fewer than 6 at 95%)."""
    n = len(values)
    ordered = sorted(values)
    best = None
    for k in range(1, n // 2 + 1):
        outside = 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n
        if 1 - outside < confidence:
            break
        best = (ordered[k - 1], ordered[n - k])
    return best


def reread(path: Path, command: str) -> dict:
    """A saved report whose ratios are read again by today's rules: each per-round ratio of
    its rows gets its ``median_interval`` (the measurements themselves are untouched), and
    the report records when and by what command (``report["reread"]``); the caller checks
    its targets again and writes it."""
    report = json.loads(Path(path).read_text())
    for rows in [report["rows"]] if "rows" in report else [s["rows"] for s in report["settings"].values()]:
        for row in rows.values():
            for found in row.values():
                if isinstance(found, dict) and "per_round" in found:
                    found["interval"] = median_interval(found["per_round"])
    report["reread"] = {"date": utc_now(), "command": command}
    return report


def reread_line(report: dict) -> list[str]:
    """The report's line saying it was read again, if it was."""
    again = report.get("reread")
    return [f"Read again {again['date']} by `{again['command']}` (the same measurements).", ""] if again else []


def expand_cases(text: str, known: list[str], groups: dict[str, list[str]]) -> list[str]:
    """Comma-separated case and group names -> case names, for an argparse ``type=``.

    Groups expand in place; a case named twice runs once, where it first appears.
    """
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in known and c not in groups]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown case(s) {unknown}; choose from {known} or the groups {sorted(groups)}")
    if not names:
        raise argparse.ArgumentTypeError("no cases given")
    cases: list[str] = []
    for name in names:
        for case in groups.get(name, [name]):
            if case not in cases:
                cases.append(case)
    return cases


def write_atomic(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, then os.replace it into place, so that a
    reader never sees a half-written report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; results are meant to be read
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_report(directory: Path, name: str, data: dict, text: str) -> None:
    """``directory/name.json`` (the figures) and ``directory/name.md`` (``text``, for a
    person), each written atomically; the markdown is printed too."""
    write_atomic(directory / f"{name}.json", json.dumps(data, indent=2) + "\n")
    write_atomic(directory / f"{name}.md", text)
    print(text)


# --------------------------------------------------------------------------- markdown


def fmt(value, spec: str, suffix: str = "") -> str:
    """``value`` formatted, or "–" when it was not measured."""
    return "–" if value is None else format(value, spec) + suffix


def table_row(cells: Sequence[str]) -> str:
    """One markdown table row; an empty cell is written "| |"."""
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


def table_head(columns: Sequence[str], left: int = 1) -> list[str]:
    """A markdown table's header and separator lines: the first ``left`` columns (and any
    whose name starts with "<") left-aligned, the others right-aligned."""
    names = [c.removeprefix("<") for c in columns]
    align = ["---" if i < left or c.startswith("<") else "---:" for i, c in enumerate(columns)]
    return [table_row(names), "|" + "|".join(align) + "|"]


def error_cells(case: str, error: str, columns: int, limit: int | None = None) -> list[str]:
    """The cells of an error row: the case, the message on one line (no "|"), then blanks."""
    message = " ".join(error.split()).replace("|", "/")[:limit]
    return [case, f"error: {message}"] + [""] * (columns - 2)
