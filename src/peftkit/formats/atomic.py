"""Writing files so that a crash (even ``kill -9`` or a power cut) never leaves half of one.

A single file (``replacing``) is written under a fresh name beside its destination,
synced, renamed over it with ``os.replace`` and the folder synced: the destination
holds the old file or the new one.

A folder of files that belong together (``write_folder``, e.g. an adapter's config and
weights) must switch as a whole, which one rename of one file cannot do:

- A folder that does not exist yet is built beside its destination
  (``.<name>.peftkit-staging-XXXX``) and renamed into place: it appears whole.
- An existing folder keeps its identity and the user's other files. The new files are
  written and synced in ``<folder>/.peftkit-staging-XXXX``; renaming that to
  ``<folder>/.peftkit-commit`` is the commit point; then each committed file is renamed
  over the live one and the emptied ``.peftkit-commit`` removed.

Before the commit the live files are the old set; after it, ``recover_folder`` (which
every reader calls first, and every writer) completes the renames, so readers see the
new set. A tool that skips ``recover_folder`` (Hugging Face PEFT, say) sees a mix only
while a killed replacement waits for the next peftkit reader or writer. A staging folder
left by a killed write is removed by the next ``write_folder`` on that folder. Two
processes writing one folder at the same moment are not supported: one of them fails with
an OSError (its staging folder removed or its commit refused), never leaving a mix.

This module imports nothing from peftkit, so a test can run it alone in a process it kills.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

STAGING = ".peftkit-staging-"
COMMIT = ".peftkit-commit"


def _fresh(parent: Path, prefix: str, suffix: str = "") -> Path:
    # A random name created exclusively rather than mkstemp/mkdtemp: those make 0600/0700
    # entries, and a renamed file or folder would keep that mode instead of the umask's.
    return parent / f"{prefix}{secrets.token_hex(6)}{suffix}"


def _fsync_folder(folder: Path) -> None:
    """Make the renames and removals inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a fresh path beside ``path`` for the caller to write; on success it is synced
    and renamed over ``path``, on an exception removed."""
    path = Path(path)
    tmp = _fresh(path.parent, f".{path.name}.", ".tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _stage(parent: Path, prefix: str, files: Mapping[str, bytes]) -> Path:
    """A new synced folder in ``parent`` holding ``files``; removed again on failure."""
    staging = _fresh(parent, prefix)
    staging.mkdir()
    try:
        for name, data in files.items():
            _write_synced(staging / name, data)
        _fsync_folder(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _remove_stale_staging(parent: Path, prefix: str) -> None:
    """Remove staging folders that a killed write left in ``parent`` (never committed)."""
    for stale in parent.iterdir():
        if stale.name.startswith(prefix) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _publish(parent: Path, prefix: str, files: Mapping[str, bytes], target: Path) -> None:
    """Stage ``files`` in ``parent`` and rename the staging folder to ``target``."""
    _remove_stale_staging(parent, prefix)
    staging = _stage(parent, prefix, files)
    try:
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_folder(parent)


def write_folder(directory: str | Path, files: Mapping[str, bytes]) -> Path:
    """Write ``files`` (name -> bytes) into ``directory`` as one set (see the module
    docstring); other files in an existing folder are left as they are."""
    directory = Path(directory)
    if not directory.exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        _publish(directory.parent, f".{directory.name}{STAGING}", files, directory)
        return directory
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a folder.")
    recover_folder(directory)  # an earlier interrupted replacement completes before this one starts
    _publish(directory, STAGING, files, directory / COMMIT)  # the commit point
    recover_folder(directory)  # moves the committed files over the live ones
    return directory


def recover_folder(directory: str | Path) -> None:
    """Complete a committed replacement in ``directory``, if one was interrupted.

    Safe to run by several processes at once: a file another one moved first is skipped.
    """
    commit = Path(directory) / COMMIT
    try:
        committed = sorted(commit.iterdir())
    except FileNotFoundError:
        return
    for entry in committed:
        with contextlib.suppress(FileNotFoundError):
            os.replace(entry, commit.parent / entry.name)
    _fsync_folder(commit.parent)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(commit)
    _fsync_folder(commit.parent)
