"""`peftkit serve`: what it refuses before starting a server (each a one-line error, exit 2),
and the config it writes. Tiny GGUF files stand in for the model; no server is started
(tests/real/test_llama_server.py starts one)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from peftkit import llama_server  # noqa: E402
from peftkit.cli import main  # noqa: E402
from peftkit.formats.gguf import read_header, write_lora_adapter  # noqa: E402

OUT, IN, R = 8, 16, 2


def write_model(path: Path, architecture: str = "llama") -> Path:
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((OUT, IN), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_adapter(path: Path, architecture: str = "llama", out: int = OUT, alpha: float = 4.0) -> Path:
    rng = np.random.default_rng(0)
    return write_lora_adapter(path, architecture, alpha, "float32", [
        ("blk.0.attn_q.weight.lora_a", rng.standard_normal((R, IN)).astype(np.float32)),
        ("blk.0.attn_q.weight.lora_b", rng.standard_normal((out, R)).astype(np.float32))])


@pytest.fixture
def files(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(llama_server, "exec_server", lambda command: pytest.fail(f"started {command}"))
    write_model(tmp_path / "base.gguf")
    write_adapter(tmp_path / "a.gguf")
    write_adapter(tmp_path / "b.gguf")
    return tmp_path


def serve(files: Path, *adapters: str, model: str = "base.gguf", extra: tuple[str, ...] = ("--print-config",)) -> int:
    args = ["serve", "--model", str(files / model), "--work-dir", str(files / "work"), *extra]
    for adapter in adapters:
        args += ["--adapter", adapter]
    return main(args)


def assert_refused(code: int, capsys, *fragments: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("write, fragments", [
    (lambda p: p.write_text("not a model"), ("--model", "not a GGUF")),
    (lambda p: None, ("--model", "does not exist")),
    (lambda p: write_adapter(p), ("--model", "is a LoRA adapter")),
    (lambda p: p.mkdir(), ("--model", "not a file")),
], ids=["not-gguf", "missing", "an-adapter", "a-folder"])
def test_a_base_that_is_not_a_gguf_model_is_refused(files, capsys, write, fragments):
    write(files / "bad.gguf")
    assert_refused(serve(files, f"a={files / 'a.gguf'}", model="bad.gguf"), capsys, *fragments)
    assert not (files / "work").exists()


@pytest.mark.parametrize("make, fragments", [
    (lambda p: None, ("--adapter x:", "does not exist")),
    (lambda p: p.write_bytes(b"GGUF garbage"), ("--adapter x:", "GGUF")),
    (lambda p: write_model(p), ("--adapter x:", "not a GGUF LoRA adapter", "'adapter'")),
    (lambda p: write_adapter(p, architecture="qwen2"), ("--adapter x:", "'qwen2'", "'llama'")),
    (lambda p: write_adapter(p, out=OUT * 2), ("--adapter x:", "blk.0.attn_q.weight.lora_b", "another model")),
    (lambda p: p.mkdir(), ("--adapter x:",)),  # a folder that holds no adapter: the export's message
], ids=["missing", "corrupt", "a-model", "other-architecture", "other-shape", "empty-folder"])
def test_an_adapter_llama_cpp_cannot_apply_to_the_base_is_refused(files, capsys, make, fragments):
    make(files / "x.gguf")
    assert_refused(serve(files, f"a={files / 'a.gguf'}", f"x={files / 'x.gguf'}"), capsys, *fragments)
    assert not (files / "work" / llama_server.CONFIG_NAME).exists()


@pytest.mark.parametrize("spec, fragments", [
    ("a.gguf", ("NAME=PATH",)),
    ("base=a.gguf", ("'base'", "another name")),
    ("my model=a.gguf", ("letters, digits",)),
    ("a=a.gguf:0", ("non-zero", '"base"')),
    ("a=a.gguf:nan", ("non-zero",)),
], ids=["no-name", "reserved-name", "space", "scale-0", "scale-nan"])
def test_a_malformed_adapter_option_is_refused(files, capsys, monkeypatch, spec, fragments):
    monkeypatch.chdir(files)
    assert_refused(serve(files, spec), capsys, *fragments)


def test_two_adapters_with_one_name_are_refused(files, capsys):
    assert_refused(serve(files, f"a={files / 'a.gguf'}", f"a={files / 'b.gguf'}"), capsys,
                   "two adapters are named 'a'", "b.gguf")


def test_a_port_in_use_is_refused(files, capsys, monkeypatch):
    monkeypatch.setattr(llama_server, "SERVER_MODULES", ())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = serve(files, f"a={files / 'a.gguf'}", extra=("--port", str(port)))
    assert_refused(code, capsys, f"127.0.0.1:{port}", "--port")
    assert not (files / "work").exists()  # refused before any work


def test_a_missing_server_package_names_the_install_command(files, capsys, monkeypatch):
    monkeypatch.setattr(llama_server, "SERVER_MODULES", ("llama_cpp", "no_such_module_for_peftkit"))
    assert_refused(serve(files, f"a={files / 'a.gguf'}", extra=()), capsys,
                   "no_such_module_for_peftkit", "pip install 'llama-cpp-python[server]'")


def test_the_config_has_base_first_and_one_entry_per_adapter(files, capsys):
    assert serve(files, f"a={files / 'a.gguf'}", f"b={files / 'b.gguf'}:0.5",
                 extra=("--print-config", "--port", "9123", "--threads", "2")) == 0
    printed = capsys.readouterr().out
    config = json.loads((files / "work" / llama_server.CONFIG_NAME).read_text())
    assert json.loads(printed[:printed.index("\n# written to")]) == config
    assert "peftkit/llama_cpp_launch.py --config_file" in printed  # llama_cpp.server, AMX crash stepped around
    assert (config["host"], config["port"]) == ("127.0.0.1", 9123)
    models = config["models"]
    assert [m["model_alias"] for m in models] == ["base", "a", "b"]  # base: what unknown names get
    assert {m["model"] for m in models} == {str((files / "base.gguf").resolve())}
    assert "lora_path" not in models[0]
    assert models[1]["lora_path"] == str((files / "a.gguf").resolve())  # a file at scale 1 is served as it is
    assert all(m["n_threads"] == 2 and m["verbose"] is False for m in models)
    scaled = Path(models[2]["lora_path"])
    assert scaled.parent == files / "work" and scaled.name == "b.scale-0.5.gguf"
    assert read_header(scaled).metadata["adapter.lora.alpha"] == 2.0  # 4 · 0.5


def test_a_scaled_copy_differs_from_its_adapter_only_in_alpha(files):
    src = files / "a.gguf"
    out = llama_server.scaled_copy(src, read_header(src), 3.0, files / "a3.gguf")
    a, b = np.fromfile(src, dtype=np.uint8), np.fromfile(out, dtype=np.uint8)
    assert a.shape == b.shape
    assert np.count_nonzero(a != b) <= 4  # one float32
    assert read_header(out).metadata["adapter.lora.alpha"] == 12.0
    assert [p.name for p in files.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_an_adapter_path_may_hold_a_colon(files, monkeypatch):
    monkeypatch.chdir(files)
    write_adapter(files / "ckpt:7.gguf")
    assert llama_server.parse_adapter("a=ckpt:7.gguf") == llama_server.AdapterSpec("a", Path("ckpt:7.gguf"), 1.0)
    assert llama_server.parse_adapter("a=ckpt:7.gguf:0.25") == llama_server.AdapterSpec("a", Path("ckpt:7.gguf"), 0.25)
    assert llama_server.parse_adapter("a=ckpt:x") == llama_server.AdapterSpec("a", Path("ckpt:x"), 1.0)


def test_the_default_work_dir_is_in_the_cache_and_follows_the_inputs(files):
    a = [llama_server.AdapterSpec("a", files / "a.gguf")]
    first = llama_server.default_work_dir(files / "base.gguf", a)
    assert first.parent == files / "cache" / "serve" and first.name.startswith("base-")
    assert llama_server.default_work_dir(files / "base.gguf", a) == first
    assert llama_server.default_work_dir(files / "base.gguf", [llama_server.AdapterSpec("a", files / "a.gguf", 2.0)]) != first


def test_the_launcher_turns_llama_cpp_s_extra_buffers_off_only_on_a_cpu_with_amx(tmp_path, monkeypatch):
    from peftkit import llama_cpp_launch

    amx, plain = tmp_path / "amx", tmp_path / "plain"
    amx.write_text("flags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n")
    plain.write_text("flags\t\t: fpu avx2 fma\n")
    assert not llama_cpp_launch.cpu_has_amx(tmp_path / "no-such-file")
    native = pytest.importorskip("llama_cpp.llama_cpp")
    monkeypatch.setattr(native, "llama_model_default_params", native.llama_model_default_params)
    original = native.llama_model_default_params
    assert original().use_extra_bufts  # llama.cpp's default: repack
    assert llama_cpp_launch.avoid_amx_crash(plain) is False
    assert native.llama_model_default_params is original  # no AMX: llama.cpp as it is
    assert llama_cpp_launch.avoid_amx_crash(amx) is True
    wrapped = native.llama_model_default_params
    assert wrapped().use_extra_bufts is False
    assert wrapped().n_gpu_layers == original().n_gpu_layers  # the rest as it was
    assert llama_cpp_launch.avoid_amx_crash(amx) is True
    assert native.llama_model_default_params is wrapped  # twice: still the one wrapper


def test_the_launcher_runs_without_importing_peftkit_or_torch(tmp_path):
    """The server process is llama_cpp.server's own: a stand-in llama_cpp.server module shows
    what the launcher has imported by the time the server starts."""
    import subprocess
    import sys

    from peftkit import llama_cpp_launch

    fake = tmp_path / "site" / "llama_cpp"
    (fake / "server").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "llama_cpp.py").write_text(
        "import ctypes\nclass llama_model_params(ctypes.Structure):\n    _fields_ = [('use_extra_bufts', ctypes.c_bool)]\n"
        "def llama_model_default_params():\n    return llama_model_params(True)\n")
    (fake / "server" / "__init__.py").write_text("")
    (fake / "server" / "__main__.py").write_text(
        "import sys\nfrom llama_cpp.llama_cpp import llama_model_default_params as params\n"
        "print(sorted(m for m in ('peftkit', 'torch', 'data', 'config') if m in sys.modules), sys.argv[1:], "
        "params().use_extra_bufts)\n")
    done = subprocess.run([sys.executable, llama_cpp_launch.__file__, "--config_file", "x.json"],
                          capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": ""})
    assert done.returncode == 0, done.stderr
    repack = not llama_cpp_launch.cpu_has_amx()  # off in the server on a CPU with AMX only
    assert done.stdout.strip() == f"[] ['--config_file', 'x.json'] {repack}"
