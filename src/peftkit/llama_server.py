"""Serve a GGUF base model with several LoRA adapters through llama-cpp-python's
OpenAI-compatible server (``python -m llama_cpp.server``).

That server takes a config file with a list of model entries; a request's ``"model"`` field
names the entry that answers it. Each adapter becomes one entry (the base plus its GGUF
LoRA, ``model_alias`` = the adapter's name), and one entry named ``"base"`` has no adapter:

    {"host": ..., "port": ..., "models": [
        {"model": BASE.gguf, "model_alias": "base", ...},
        {"model": BASE.gguf, "model_alias": "NAME", "lora_path": NAME.gguf, ...}, ...]}

Three facts of llama_cpp.server shape what is built here:

- It holds one model at a time: a request for another entry closes the current one and
  loads the next (base and adapter) from disk.
- It reads no LoRA scale from the config (its ModelSettings has no ``lora_scale``), so a
  scale is written into a copy of the adapter file: llama.cpp applies s · (alpha / r) · B A,
  and a copy whose alpha is s · alpha applies exactly that with s = 1.
- A request naming no known entry is answered by the first entry without an error; that
  entry is "base", so a misspelt name gets the base model, never another adapter.

A peftkit or PEFT LoRA folder is exported to GGUF (``export_gguf_lora``) into the work
folder, which also holds the scaled copies and the config: by default a folder under the
peftkit cache named after the inputs, so the same command reuses (and rewrites) the same one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from .formats import atomic
from .formats.gguf import GgufError, GgufHeader, gguf_package, read_header

BASE_ALIAS = "base"
CONFIG_NAME = "llama_server.json"
# What `python -m llama_cpp.server` imports beyond llama_cpp itself (its [server] extra).
SERVER_MODULES = ("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
INSTALL_HINT = "pip install 'llama-cpp-python[server]' (or pip install 'peftkit[real]')"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ServeError(ValueError):
    """Input the server cannot be started with; the message says what and how to fix it."""


@dataclass(frozen=True)
class AdapterSpec:
    """One ``--adapter NAME=PATH[:SCALE]``: a GGUF LoRA file or a LoRA folder."""

    name: str
    path: Path
    scale: float = 1.0


@dataclass(frozen=True)
class Entry:
    """One model entry of the server: what a request with ``"model": name`` runs."""

    name: str
    lora: Path | None      # the GGUF LoRA file llama.cpp loads (None: the base alone)
    source: Path | None    # what the user named (the folder or file it came from)
    scale: float = 1.0


def parse_adapter(text: str) -> AdapterSpec:
    """``NAME=PATH`` or ``NAME=PATH:SCALE``; a path that exists as given keeps its colons."""
    name, sep, rest = text.partition("=")
    if not sep or not rest:
        raise ServeError(f"--adapter {text!r}: expected NAME=PATH or NAME=PATH:SCALE (e.g. math=out/adapter).")
    path, scale = rest, 1.0
    head, colon, tail = rest.rpartition(":")
    if colon and head and not Path(rest).exists():
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass  # no number after the last colon: it belongs to the path
    if not _NAME.fullmatch(name):
        raise ServeError(f"--adapter {text!r}: the name {name!r} must be letters, digits, '.', '_' or '-' "
                         "(it is the request's \"model\" field).")
    if name == BASE_ALIAS:
        raise ServeError(f"--adapter {text!r}: {BASE_ALIAS!r} is the entry without an adapter; choose another name.")
    if not math.isfinite(scale) or scale == 0:
        raise ServeError(f"--adapter {text!r}: the scale must be a non-zero number (scale 0 is the base model: "
                         f"request \"model\": \"{BASE_ALIAS}\").")
    return AdapterSpec(name, Path(path), scale)


def check_names(specs: list[AdapterSpec]) -> None:
    seen: dict[str, AdapterSpec] = {}
    for spec in specs:
        if spec.name in seen:
            raise ServeError(f"two adapters are named {spec.name!r} ({seen[spec.name].path} and {spec.path}); "
                             "each name is one model entry, so names must differ.")
        seen[spec.name] = spec


def require_server() -> None:
    """Refuse to go on without llama_cpp.server's modules (found, not imported)."""
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ServeError(f"llama_cpp.server needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                         f"not installed: {INSTALL_HINT}.")


def read_gguf(path: Path, role: str, hint: str) -> GgufHeader:
    """The header of ``path``, or a ServeError starting with ``role`` ("--model") and ending with ``hint``."""
    if not path.exists():
        raise ServeError(f"{role} {path} does not exist.")
    if not path.is_file():
        raise ServeError(f"{role} {path} is not a file; {hint}.")
    try:
        return read_header(path)
    except GgufError as e:
        raise ServeError(f"{role} {e}; {hint}.") from e
    except ImportError as e:
        raise ServeError(f"reading GGUF files {e}") from e


def check_base(path: Path) -> GgufHeader:
    header = read_gguf(path, "--model", "pass the base model's .gguf file")
    if header.metadata.get("general.type") == "adapter":
        raise ServeError(f"--model {path} is a LoRA adapter, not a model; pass the model's .gguf as --model "
                         "and the adapter with --adapter NAME=FILE.")
    return header


def check_adapter(path: Path, base: GgufHeader, name: str) -> GgufHeader:
    """A GGUF LoRA file that llama.cpp can apply to ``base``: its type, architecture, and
    every pair's shape against the base weight it adapts (llama.cpp would refuse it at the
    first request for ``name``, long after the server started)."""
    role = f"--adapter {name}:"
    header = read_gguf(path, role, "pass a GGUF LoRA file or a LoRA adapter folder")
    kind = header.metadata.get("general.type")
    if kind != "adapter" or header.metadata.get("adapter.type", "lora") != "lora":
        raise ServeError(f"{role} {path} is not a GGUF LoRA adapter (general.type is {kind!r}, not "
                         "'adapter'); export a LoRA folder with 'peftkit export', or pass the folder itself.")
    if header.architecture != base.architecture:
        raise ServeError(f"{role} {path} is for a {header.architecture!r} model and the base {base.path} "
                         f"is {base.architecture!r}; it was trained on another model.")
    for tensor_name, tensor in sorted(header.tensors.items()):
        weight, _, part = tensor_name.rpartition(".")
        target = base.tensors.get(weight)
        if part not in ("lora_a", "lora_b") or target is None:
            raise ServeError(f"{role} {path} holds {tensor_name}, which adapts no weight of the base "
                             f"{base.path}; it was made for another model.")
        side = tensor.shape[-1] if part == "lora_a" else tensor.shape[0]  # lora_a (r, in), lora_b (out, r)
        if side != target.shape[-1 if part == "lora_a" else 0]:
            raise ServeError(f"{role} {tensor_name} is {tensor.shape} but the base weight {weight} is "
                             f"{target.shape} (out, in); the adapter was made for another model.")
    return header


def scaled_copy(src: Path, header: GgufHeader, scale: float, out: Path) -> Path:
    """A copy of the GGUF LoRA ``src`` that llama.cpp applies at ``scale`` (alpha · scale).

    The value is changed in place in the copy, as gguf-py's gguf_set_metadata.py does.
    """
    alpha = header.metadata.get("adapter.lora.alpha")
    if not alpha:
        raise ServeError(f"{src} has no adapter.lora.alpha (llama.cpp applies it unscaled), so no scale can be "
                         "written into a copy; serve it without :SCALE, or export it again with peftkit.")
    gguf = gguf_package()
    with atomic.replacing(out) as tmp:
        shutil.copyfile(src, tmp)
        reader = gguf.GGUFReader(tmp, "r+")
        field = reader.fields["adapter.lora.alpha"]
        field.parts[field.data[0]][0] = alpha * scale
        reader.data.flush()
        del reader, field
    return out


def default_work_dir(base: Path, specs: list[AdapterSpec]) -> Path:
    """A folder in the peftkit cache named after the inputs: the same command, the same folder."""
    from .loading import cache_dir

    key = json.dumps([str(base.resolve())] + [[s.name, str(s.path.resolve()), s.scale] for s in specs])
    return cache_dir() / "serve" / f"{base.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def prepare(base: Path, specs: list[AdapterSpec], work_dir: Path) -> list[Entry]:
    """Check the base and the adapters, export folders and write scaled copies into
    ``work_dir``; the entries, "base" first. Raises ServeError."""
    check_names(specs)
    base_header = check_base(base)
    for spec in specs:  # every path checked before anything is exported
        if not spec.path.exists():
            raise ServeError(f"--adapter {spec.name}: {spec.path} does not exist.")
    entries = [Entry(BASE_ALIAS, None, None)]
    for spec in specs:
        lora = spec.path
        if spec.path.is_dir():
            from .export import export_gguf_lora

            work_dir.mkdir(parents=True, exist_ok=True)
            try:
                lora = export_gguf_lora(spec.path, work_dir / f"{spec.name}.gguf", base=base, overwrite=True)
            except ValueError as e:  # ExportError, AdapterFileError, LayoutError: the folder's problem
                raise ServeError(f"--adapter {spec.name}: {e}") from e
        header = check_adapter(lora, base_header, spec.name)
        if spec.scale != 1:
            work_dir.mkdir(parents=True, exist_ok=True)
            lora = scaled_copy(lora, header, spec.scale, work_dir / f"{spec.name}.scale-{spec.scale:g}.gguf")
        entries.append(Entry(spec.name, lora.resolve(), spec.path, spec.scale))
    return entries


def server_config(base: Path, entries: list[Entry], *, host: str, port: int, n_ctx: int,
                  n_threads: int | None = None, verbose: bool = False) -> dict:
    """llama_cpp.server's config (its ConfigFileSettings): one model entry per ``entries``."""
    if n_ctx < 1 or (n_threads is not None and n_threads < 1):
        raise ServeError(f"--n-ctx ({n_ctx}) and --threads ({n_threads}) must be at least 1.")
    models = []
    for entry in entries:
        model = {"model": str(base.resolve()), "model_alias": entry.name, "n_ctx": n_ctx, "verbose": verbose}
        if entry.lora is not None:
            model["lora_path"] = str(entry.lora)
        if n_threads is not None:
            model["n_threads"] = model["n_threads_batch"] = n_threads
        models.append(model)
    return {"host": host, "port": port, "models": models}


def write_config(config: dict, work_dir: Path) -> Path:
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / CONFIG_NAME
    with atomic.replacing(path) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return path


def server_command(config_path: Path) -> list[str]:
    """llama_cpp.server through ``llama_cpp_launch`` (llama.cpp's crash on AMX CPUs, stepped
    around), run as a file so that the server does not import peftkit and torch."""
    launcher = Path(__file__).with_name("llama_cpp_launch.py")
    return [sys.executable, str(launcher), "--config_file", str(config_path)]


def check_port(host: str, port: int) -> None:
    """Refuse a port another process listens on (bound as uvicorn binds: with SO_REUSEADDR)."""
    if not 1 <= port <= 65535:
        raise ServeError(f"--port {port}: a port is 1-65535.")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as e:
        raise ServeError(f"cannot listen on {host}:{port} ({e.strerror or e}); is another server running there? "
                         "Pass another --port.") from e


def exec_server(command: list[str]) -> None:
    """Become the server (os.execv): signals, Ctrl-C and the exit status are its own."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
