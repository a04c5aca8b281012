"""The serve command: a GGUF base and several LoRA adapters behind llama.cpp's
OpenAI-compatible server (llama-cpp-python's llama_cpp.server)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from .output import _fail, _table


def _example_request(url: str, name: str) -> str:
    # repeat_penalty 1: plain greedy decoding (llama_cpp.server defaults to 1.1, llama.cpp itself to 1)
    body = json.dumps({"model": name, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0,
                       "repeat_penalty": 1.0})
    return f"curl {url}/v1/completions -H 'Content-Type: application/json' -d {shlex.quote(body)}"


def cmd_serve(args: argparse.Namespace) -> int:
    """Check and prepare everything, print the URL and an example, then become the server."""
    from .. import llama_server as ls

    try:
        specs = [ls.parse_adapter(text) for text in args.adapter]
        base = Path(args.model)
        if not args.print_config:  # before any export: the server cannot start without them
            ls.require_server()
            ls.check_port(args.host, args.port)
        work_dir = Path(args.work_dir) if args.work_dir else ls.default_work_dir(base, specs)
        entries = ls.prepare(base, specs, work_dir)
        config = ls.server_config(base, entries, host=args.host, port=args.port, n_ctx=args.n_ctx,
                                  n_threads=args.threads, verbose=args.verbose)
        config_path = ls.write_config(config, work_dir)
    except (ValueError, OSError, ImportError) as e:
        return _fail(str(e))
    command = ls.server_command(config_path)
    if args.print_config:
        print(json.dumps(config, indent=2))
        print(f"# written to {config_path}; start it with:\n{shlex.join(command)}")
        return 0
    url = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port}"  # [::1]: an IPv6 address
    rows = []
    for entry in entries:
        if entry.lora is None:
            what = f"{base} alone"
        else:
            what = str(entry.source) + (f" at scale {entry.scale:g}" if entry.scale != 1 else "")
            if entry.lora != entry.source.resolve():
                what += f" (as {entry.lora})"
        rows.append((f'"{entry.name}"', what))
    print(f"serving {url}/v1 (llama_cpp.server, config {config_path}); the request's \"model\" picks:")
    print(_table(rows))
    print("switching to another model reloads it (one is held at a time); an unknown name gets \"base\".")
    print(f"try:  {_example_request(url, entries[-1].name)}", flush=True)
    ls.exec_server(command)
    return 0  # not reached: exec_server replaces this process
