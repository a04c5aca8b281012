"""`peftkit serve` on a real model: SmolLM2-135M (its Q4_1 GGUF) behind llama_cpp.server with
two peftkit adapters, one given as a LoRA folder and one as a GGUF file, plus a scaled
entry. Over loopback HTTP, each request's greedy completion must equal llama.cpp's own
with that adapter alone (llama_cpp.Llama in a fresh process), whatever was served before.

Both sides run the same quantized file, so what is compared is the serving, not the export
(test_gguf_export.py checks that against torch on a float32 copy); the small file keeps each
model switch, which reloads it, short. The adapters come from llama_cpp_models.py's helpers.
The server runs in a subprocess that is always stopped (terminate, then kill) at the end.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")  # the llama_cpp.server extra (pip install 'llama-cpp-python[server]')
pytest.importorskip("uvicorn")

from llama_cpp_models import LLAMA_CPP_ENV, Q4_GGUF, require_smollm2, train_like_adapter  # noqa: E402

require_smollm2()

from peftkit import LoraConfig  # noqa: E402
from peftkit.export import export_gguf_lora  # noqa: E402

PROMPT = "The three most important things in a kitchen are"
MAX_TOKENS = 12
N_CTX = 128
SCALE = 0.5
STARTUP_S = 120
# One thread on both sides: on a shared 2-core machine two llama.cpp threads that wait for each
# other made one completion take 3 s instead of 1 (once 66 s).
THREADS = 1
# Plain greedy decoding on both sides: llama_cpp.server's repeat_penalty default is 1.1.
SAMPLING = {"max_tokens": MAX_TOKENS, "temperature": 0, "repeat_penalty": 1.0}

_GREEDY = """
import json, sys
from llama_cpp import Llama
model, jobs = sys.argv[1], json.loads(sys.argv[2])
texts = []
for lora, scale in jobs:  # a fresh Llama per adapter: llama.cpp with that adapter alone
    llm = Llama(model_path=model, lora_path=lora, lora_scale=scale, n_ctx=%d, n_threads=%d, seed=0, verbose=False)
    out = llm.create_completion(%r, **json.loads(sys.argv[3]))
    texts.append(out["choices"][0]["text"])
    llm.close()
print(json.dumps(texts))
""" % (N_CTX, THREADS, PROMPT)


def llama_cpp_greedy(model: Path, jobs: list[tuple[Path | None, float]]) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", _GREEDY, str(model), json.dumps([[str(p) if p else None, s] for p, s in jobs]),
         json.dumps(SAMPLING)],
        capture_output=True, text=True, timeout=300, env=LLAMA_CPP_ENV)
    assert done.returncode == 0, f"llama.cpp failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_until_up(proc: subprocess.Popen, url: str, log: Path) -> list[str]:
    """The served model names, once the server answers; fails if it exits or takes too long."""
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
                return [m["id"] for m in json.loads(response.read())["data"]]
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"the server did not answer within {STARTUP_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def adapters(_smollm2_loaded, tmp_path_factory) -> tuple[Path, Path]:
    """Two adapters with different effects, both all-linear: "a" r=4 (served as a folder), "b"
    r=8 (served as a GGUF file); the other shapes give other random values. The session's
    SmolLM2 is shared, not copied: train_like_adapter unloads what it attaches."""
    smollm, root = _smollm2_loaded.model, tmp_path_factory.mktemp("adapters")
    train_like_adapter(smollm, LoraConfig(r=4, alpha=8, target_modules="all-linear"), root / "a", b_std=0.1)
    train_like_adapter(smollm, LoraConfig(r=8, alpha=16, target_modules="all-linear"), root / "b", b_std=0.1)
    return root / "a", root / "b"


def test_each_request_gets_llama_cpp_output_with_its_adapter_alone(adapters, tmp_path):
    folder_a, folder_b = adapters
    t0 = time.monotonic()
    gguf_a = export_gguf_lora(folder_a, tmp_path / "ref-a.gguf", base=Q4_GGUF)  # the reference's own export
    gguf_b = export_gguf_lora(folder_b, tmp_path / "b.gguf", base=Q4_GGUF)
    expected = dict(zip(["base", "a", "b", "b_half"], llama_cpp_greedy(
        Q4_GGUF, [(None, 1.0), (gguf_a, 1.0), (gguf_b, 1.0), (gguf_b, SCALE)]), strict=True))
    print(f"\n  exported and llama.cpp alone in {time.monotonic() - t0:.1f} s")
    print("\n".join(f"  {name:7s} {text!r}" for name, text in expected.items()))
    # Four different completions, or the comparisons below could pass with the wrong entry.
    assert len(set(expected.values())) == 4, expected

    port, log = free_port(), tmp_path / "server.log"
    command = [sys.executable, "-m", "peftkit", "serve", "--model", str(Q4_GGUF), "--port", str(port),
               "--adapter", f"a={folder_a}", "--adapter", f"b={gguf_b}", "--adapter", f"b_half={gguf_b}:{SCALE}",
               "--n-ctx", str(N_CTX), "--threads", str(THREADS), "--work-dir", str(tmp_path / "work")]
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with open(log, "w") as out:
        # Not LLAMA_CPP_ENV: peftkit serve steps around llama.cpp's AMX crash by itself.
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_until_up(proc, url, log) == ["base", "a", "b", "b_half"]
        up = time.monotonic() - started
        printed = log.read_text()
        assert f"serving {url}/v1" in printed and '"model": "b_half"' in printed  # the example request
        served = []
        for name in ["base", "a", "b", "a", "b_half"]:  # after the first, each a switch
            reply = post(f"{url}/v1/completions", {"model": name, "prompt": PROMPT, **SAMPLING})
            assert reply["model"] == name
            served.append((name, reply["choices"][0]["text"]))
        # What `serve` prints: a name the server does not know gets the first entry, "base".
        unknown = post(f"{url}/v1/completions", {"model": "no-such-adapter", "prompt": PROMPT, **SAMPLING})
        served.append(("base", unknown["choices"][0]["text"]))
        print(f"  server up in {up:.1f} s, six requests in {time.monotonic() - started - up:.1f} s")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
    for name, text in served:
        assert text == expected[name], (name, text, expected[name])
