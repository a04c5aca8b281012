"""NF4 (QLoRA) frozen base on the CPU: torchao's NF4Tensor vs bitsandbytes' 4-bit NF4.

Measures, per library, in one process (torch threads = all cores):
  1. import/work on this torch: warnings printed on import (fresh subprocess, -W always),
     quantize -> dequantize -> linear with autograd through the input only;
  2. per weight shape (576x1536, 1536x576, 2048x5632; W ~ N(0, 0.02), float32): quantize time,
     bytes actually stored (codes + all scales) vs bf16, error of the dequantized weight vs the
     float32 W (relative Frobenius, max abs), and vs an independent float64 NF4 reference
     (QLoRA code values, blockwise absmax 64, no double quantization) and vs each other;
  3. forward + backward (grad w.r.t. the input only) of x[1024, in] @ deq(W)^T, bf16 and fp32
     inputs, round-robin over cases, min over 5 rounds, vs plain F.linear with the bf16 weight
     (cast to the input dtype);
  4. what autograd keeps for the backward of one linear (saved_tensors_hooks + ctx attributes);
  5./6. module behaviour: F.linear dispatch, .to(dtype), dtype reported, autocast, module.to,
     deepcopy, state_dict, torch.save and safetensors round trips.
Usage (from the repo root): /tmp/qvenv/bin/python bench/nf4_choice.py
Writes bench/results/nf4_choice.json and bench/results/nf4_choice.md.
"""
from __future__ import annotations

import copy, io, json, os, platform, subprocess, sys, time, traceback, warnings
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(576, 1536), (1536, 576), (2048, 5632)]        # (in, out) as the brief lists them
TOKENS, ROUNDS, REPS = 8 * 128, 5, 1
BF16_MAX_NUMEL = 1_000_000   # bf16 GEMM on a CPU without AVX512-BF16 is ~100x slower than fp32: skip big bf16
# QLoRA NF4 code values (Dettmers et al. 2023, as in bitsandbytes' table).
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]


def import_warnings(stmt: str) -> dict:
    p = subprocess.run([sys.executable, "-W", "always", "-c", stmt], capture_output=True, text=True)
    return {"rc": p.returncode, "stderr": [l for l in (p.stderr + p.stdout).splitlines() if l.strip()][-12:]}


from torchao.quantization import NF4Tensor, to_nf4                      # noqa: E402
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4  # noqa: E402
import bitsandbytes as bnb                                             # noqa: E402
import bitsandbytes.functional as bnbF                                 # noqa: E402


def ref_nf4(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Plain NF4 in float64: per-64 absmax, nearest code, no double quantization."""
    w64 = w.double().reshape(-1, block)
    absmax = w64.abs().amax(1, keepdim=True)
    code = torch.tensor(NF4, dtype=torch.float64)
    idx = ((w64 / absmax).unsqueeze(-1) - code).abs().argmin(-1)
    return (code[idx] * absmax).reshape(w.shape)


def ao_bytes(t: NF4Tensor) -> int:
    return sum(getattr(t, n).nbytes for n in t.__tensor_flatten__()[0])


def bnb_bytes(q, qs) -> int:
    return q.nbytes + sum(v.nbytes for v in qs.as_dict(packed=True).values() if torch.is_tensor(v))


# name -> (quantize(W_fp32) -> handle, dequantize(handle) -> fp32 tensor, linear(x, handle), bytes)
LIBS = {
    "torchao (bf16 in)": (lambda w: to_nf4(w.bfloat16()), lambda h: h.get_original_weight().float(),
                          lambda x, h: linear_nf4(x, h), ao_bytes),
    "torchao (fp32 in)": (lambda w: to_nf4(w), lambda h: h.get_original_weight().float(),
                          lambda x, h: linear_nf4(x, h), ao_bytes),
    "bnb nf4 dq (bf16 in)": (
        lambda w: bnbF.quantize_4bit(w.bfloat16(), blocksize=64, quant_type="nf4", compress_statistics=True),
        lambda h: bnbF.dequantize_4bit(*h).float(),
        lambda x, h: bnb.matmul_4bit(x, h[0], quant_state=h[1]), lambda h: bnb_bytes(*h)),
    "bnb nf4 (bf16 in)": (
        lambda w: bnbF.quantize_4bit(w.bfloat16(), blocksize=64, quant_type="nf4", compress_statistics=False),
        lambda h: bnbF.dequantize_4bit(*h).float(),
        lambda x, h: bnb.matmul_4bit(x, h[0], quant_state=h[1]), lambda h: bnb_bytes(*h)),
}


def accuracy_and_size(results: dict) -> dict:
    for fin, fout in SHAPES:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(fout, fin, generator=g) * 0.02                   # [out, in], as nn.Linear
        ref = ref_nf4(w)
        wn = w.double().norm()
        rows, deqs = {}, {"reference f64": ref}
        for name, (quant, deq, _, nbytes) in LIBS.items():
            t0 = time.perf_counter(); h = quant(w); qt = time.perf_counter() - t0
            d = deq(h).double(); deqs[name] = d
            rows[name] = {"quantize_ms": qt * 1e3, "bytes": nbytes(h), "bytes_vs_bf16": nbytes(h) / (w.numel() * 2),
                          "rel_fro_vs_W": ((d - w.double()).norm() / wn).item(),
                          "max_abs_vs_W": (d - w.double()).abs().max().item(),
                          "rel_fro_vs_ref": ((d - ref).norm() / wn).item()}
        rows["reference f64"] = {"rel_fro_vs_W": ((ref - w.double()).norm() / wn).item(),
                                 "max_abs_vs_W": (ref - w.double()).abs().max().item()}
        rows["bf16 weight"] = {"bytes": w.numel() * 2, "bytes_vs_bf16": 1.0,
                               "rel_fro_vs_W": ((w.bfloat16().double() - w.double()).norm() / wn).item()}
        names = list(deqs)
        cross = {f"{a} | {b}": ((deqs[a] - deqs[b]).norm() / wn).item()
                 for i, a in enumerate(names) for b in names[i + 1:]}
        results["accuracy"][f"{fin}x{fout}"] = {"rows": rows, "cross_rel_fro": cross}
    return results


def fwd_bwd(fn, x, gy):
    x.grad = None
    fn(x).backward(gy)


def speed(results: dict) -> dict:
    for fin, fout in SHAPES:
        w = torch.randn(fout, fin, generator=torch.Generator().manual_seed(0)) * 0.02
        handles = {"torchao": to_nf4(w.bfloat16()),
                   "bnb (dq)": bnbF.quantize_4bit(w.bfloat16(), blocksize=64, quant_type="nf4", compress_statistics=True)}
        for dt in (torch.bfloat16, torch.float32):
            if dt == torch.bfloat16 and fin * fout > BF16_MAX_NUMEL:
                results["speed"][f"{fin}x{fout} bfloat16"] = {"skipped": "bf16 GEMM too slow on this CPU"}
                continue
            x = torch.randn(TOKENS, fin, dtype=dt, requires_grad=True)
            gy = torch.randn(TOKENS, fout, dtype=dt)
            wp = w.bfloat16().to(dt)
            cases = {"plain F.linear": lambda x: F.linear(x, wp),
                     "torchao": lambda x: linear_nf4(x, handles["torchao"]),
                     "bnb (dq)": lambda x: bnb.matmul_4bit(x, handles["bnb (dq)"][0], quant_state=handles["bnb (dq)"][1])}
            best = {k: float("inf") for k in cases}
            errs = {}
            for k, fn in list(cases.items()):
                try:
                    fwd_bwd(fn, x, gy)                                   # warm-up
                except Exception as e:                                    # noqa: BLE001
                    errs[k] = f"{type(e).__name__}: {e}"; cases.pop(k)
            for _ in range(ROUNDS):
                for k, fn in cases.items():
                    t0 = time.perf_counter()
                    for _ in range(REPS):
                        fwd_bwd(fn, x, gy)
                    best[k] = min(best[k], (time.perf_counter() - t0) / REPS * 1e3)
            base = best["plain F.linear"]
            results["speed"][f"{fin}x{fout} {str(dt)[6:]}"] = {
                k: ({"error": errs[k]} if k in errs else {"ms": best[k], "ratio": best[k] / base}) for k in best}
            print(f"speed {fin}x{fout} {dt}: {best}", flush=True)
    return results


def saved_for_backward(fn, x) -> dict:
    """What autograd keeps between forward and backward of one linear."""
    packed = []
    def pack(t):
        inner = sum(getattr(t, n).nbytes for n in t.__tensor_flatten__()[0]) if isinstance(t, NF4Tensor) else None
        packed.append({"type": type(t).__name__, "shape": list(t.shape), "dtype": str(t.dtype),
                       "bytes": inner if inner is not None else t.numel() * t.element_size()})
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    ctx_attrs = {}
    for k, v in vars(y.grad_fn).items() if hasattr(y.grad_fn, "__dict__") else []:
        vs = v if isinstance(v, tuple) else (v,)
        ctx_attrs[k] = [None if t is None else {"shape": list(t.shape), "dtype": str(t.dtype), "bytes": t.nbytes}
                        for t in vs if t is None or torch.is_tensor(t)] or type(v).__name__
    return {"grad_fn": type(y.grad_fn).__name__, "saved_tensors_hooks": packed, "ctx_attributes": ctx_attrs}


def attempt(fn):
    try:
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            out = fn()
        return {"ok": True, "result": out, "warnings": sorted({str(w.message)[:200] for w in ws})}
    except Exception as e:                                                # noqa: BLE001
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}


def behaviour(results: dict) -> dict:
    fin, fout = 576, 1536
    w = torch.randn(fout, fin, generator=torch.Generator().manual_seed(1)) * 0.02
    x = torch.randn(TOKENS, fin, dtype=torch.bfloat16, requires_grad=True)
    nf = to_nf4(w.bfloat16())
    deq = nf.get_original_weight()
    ao_mod = lambda: torch.nn.Linear(fin, fout, bias=False).requires_grad_(False)  # noqa: E731
    def ao_module():
        m = ao_mod(); m.weight = torch.nn.Parameter(to_nf4(w.bfloat16()), requires_grad=False); return m
    kind = lambda m: f"{type(m.weight.data if isinstance(m.weight, torch.nn.Parameter) else m.weight).__name__} {m.weight.dtype}"  # noqa: E731
    def ao_roundtrip():
        m = ao_module(); buf = io.BytesIO(); torch.save(m.state_dict(), buf); buf.seek(0)
        sd = torch.load(buf, weights_only=True); return f"{type(sd['weight']).__name__}, max|diff|=" \
            f"{(sd['weight'].get_original_weight() - m.weight.get_original_weight()).abs().max().item()}"
    def safetensors_save(sd):
        from safetensors.torch import save, load
        return sorted(load(save(sd)).keys())
    ao = {
        "dtype_reported": str(nf.dtype), "type": type(nf).__name__, "is_NF4Tensor_subclass_of_Tensor": True,
        "F.linear(x, nf4) == linear_nf4": attempt(lambda: (F.linear(x, nf) - linear_nf4(x, nf)).abs().max().item()),
        "F.linear grad_fn": attempt(lambda: type(F.linear(x, nf).grad_fn).__name__),
        "x @ nf4.t()": attempt(lambda: (x @ nf.t() - F.linear(x, deq)).abs().max().item()),
        "nf4.to(bf16) dequantizes": attempt(lambda: f"{type(nf.to(torch.bfloat16)).__name__}, "
                                                    f"max|diff vs get_original_weight|={(nf.to(torch.bfloat16) - deq).abs().max().item()}"),
        "nf4.to('cpu') keeps NF4": attempt(lambda: type(nf.to("cpu")).__name__),
        "fp32 x, bf16 nf4, F.linear": attempt(lambda: str(F.linear(x.float(), nf).dtype)),
        "autocast cpu bf16, fp32 x": attempt(lambda: _autocast(lambda: F.linear(x.detach().float().requires_grad_(), nf))),
        "module.to('cpu')": attempt(lambda: kind(ao_module().to("cpu"))),
        "module.to(torch.float32)": attempt(lambda: kind(ao_module().to(torch.float32))),
        "module.bfloat16()": attempt(lambda: kind(ao_module().bfloat16())),
        "copy.deepcopy(module)": attempt(lambda: kind(copy.deepcopy(ao_module()))),
        "module forward+backward": attempt(lambda: _fb(ao_module(), x)),
        "state_dict()": attempt(lambda: {k: type(v).__name__ for k, v in ao_module().state_dict().items()}),
        "torch.save/load(weights_only=True)": attempt(ao_roundtrip),
        "safetensors of state_dict": attempt(lambda: safetensors_save(ao_module().state_dict())),
        "safetensors of inner tensors": attempt(lambda: safetensors_save(
            {n: getattr(nf, n).contiguous() for n in nf.__tensor_flatten__()[0]})),
        "saved_for_backward": saved_for_backward(lambda x: linear_nf4(x, nf), x),
    }
    def bnb_module():
        m = bnb.nn.Linear4bit(fin, fout, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4")
        m.weight = bnb.nn.Params4bit(w.bfloat16(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", blocksize=64)
        return m.to("cpu")                                                # quantizes on the first .to(device)
    def bnb_roundtrip():
        from safetensors.torch import save, load
        m = bnb_module(); sd = load(save({k: v.contiguous() for k, v in m.state_dict().items()}))
        m2 = bnb.nn.Linear4bit(fin, fout, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        m2.load_state_dict(sd)
        return f"keys={sorted(sd)}, max|diff|={(m2(x.detach()) - m(x.detach())).abs().max().item()}"
    q, qs = bnbF.quantize_4bit(w.bfloat16(), blocksize=64, quant_type="nf4", compress_statistics=True)
    bb = {
        "packed weight": f"{q.dtype} {list(q.shape)}; quant_state.dtype={qs.dtype}, nested={qs.nested}, "
                         f"absmax {qs.absmax.dtype} {list(qs.absmax.shape)}, state2.absmax {qs.state2.absmax.dtype} "
                         f"{list(qs.state2.absmax.shape)} blocksize {qs.state2.blocksize}, offset={float(qs.offset):.5g}",
        "fp32 x, bf16-quantized weight": attempt(lambda: str(bnb.matmul_4bit(x.float(), q, quant_state=qs).dtype)),
        "autocast cpu bf16, fp32 x": attempt(lambda: _autocast(lambda: bnb.matmul_4bit(
            x.detach().float().requires_grad_(), q, quant_state=qs))),
        "Linear4bit module forward+backward": attempt(lambda: _fb(bnb_module(), x)),
        "Linear4bit weight after .to('cpu')": attempt(lambda: f"{type(bnb_module().weight).__name__} "
                                                             f"{bnb_module().weight.dtype} {list(bnb_module().weight.shape)}"),
        "module.to(torch.float32)": attempt(lambda: (lambda m: f"{m.weight.dtype} {list(m.weight.shape)} "
                                                             f"fwd ok: {m(x.detach().float()).dtype}")(bnb_module().to(torch.float32))),
        "copy.deepcopy(module)": attempt(lambda: (lambda m: f"{type(m.weight).__name__} qs={m.weight.quant_state is not None}, "
                                                         f"max|diff|={(m(x.detach()) - bnb_module()(x.detach())).abs().max().item()}")(copy.deepcopy(bnb_module()))),
        "state_dict keys": attempt(lambda: {k: f"{v.dtype} {list(v.shape)}" for k, v in bnb_module().state_dict().items()}),
        "safetensors state_dict round trip": attempt(bnb_roundtrip),
        "saved_for_backward": saved_for_backward(lambda x: bnb.matmul_4bit(x, q, quant_state=qs), x),
    }
    plain = saved_for_backward(lambda x: F.linear(x, w.bfloat16()), x)
    results["behaviour"] = {"torchao": ao, "bitsandbytes": bb, "plain F.linear bf16 saved": plain}
    return results


def _autocast(f):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = f()
    y.float().sum().backward()
    return f"out {y.dtype}, backward ok"


def _fb(m, x):
    x = x.detach().requires_grad_()
    y = m(x); y.float().sum().backward()
    return f"out {y.dtype}, x.grad {x.grad.dtype}, weight.grad={m.weight.grad}"


def markdown(r: dict) -> str:
    L = [f"# NF4 base: torchao NF4Tensor vs bitsandbytes (CPU)", "",
         f"{r['date']} · `{r['command']}` · {r['machine']['cpu']} ({r['machine']['cpus']} cores, "
         f"{r['machine']['torch_threads']} torch threads) · Python {r['machine']['python']} · torch {r['versions']['torch']} "
         f"· torchao {r['versions']['torchao']} · bitsandbytes {r['versions']['bitsandbytes']}", "",
         "## Size and dequantization error (W ~ N(0, 0.02) float32, [out, in])", "",
         "| shape in x out | method | quantize ms | bytes | vs bf16 | rel Frobenius vs W | max abs vs W | rel Frob vs f64 ref |",
         "|---|---|---:|---:|---:|---:|---:|---:|"]
    f = lambda v, s: "–" if v is None else format(v, s)  # noqa: E731
    for shape, a in r["accuracy"].items():
        for name, row in a["rows"].items():
            L.append(f"| {shape} | {name} | {f(row.get('quantize_ms'), '.1f')} | {f(row.get('bytes'), ',')} | "
                     f"{f(row.get('bytes_vs_bf16'), '.4f')} | {f(row.get('rel_fro_vs_W'), '.5f')} | "
                     f"{f(row.get('max_abs_vs_W'), '.2e')} | {f(row.get('rel_fro_vs_ref'), '.5f')} |")
    L += ["", "Cross comparison of dequantized weights, ||a - b|| / ||W||:", ""]
    for shape, a in r["accuracy"].items():
        L.append(f"- {shape}: " + "; ".join(f"{k}: {v:.5f}" for k, v in a["cross_rel_fro"].items()))
    L += ["", f"## Forward + backward (grad w.r.t. x only), x [{TOKENS}, in], min over {ROUNDS} rounds of {REPS}", "",
          "| shape, input dtype | plain F.linear ms | torchao ms | ratio | bnb (dq) ms | ratio |", "|---|---:|---:|---:|---:|---:|"]
    for key, s in r["speed"].items():
        if "skipped" in s:
            L.append(f"| {key} | skipped: {s['skipped']} | | | | |"); continue
        c = lambda k, q: "err" if "error" in s[k] else format(s[k][q], ".2f")  # noqa: E731
        L.append(f"| {key} | {c('plain F.linear', 'ms')} | {c('torchao', 'ms')} | {c('torchao', 'ratio')} | "
                 f"{c('bnb (dq)', 'ms')} | {c('bnb (dq)', 'ratio')} |")
    L += ["", "## Import warnings", ""] + [f"- {k} (rc {v['rc']}): " + (" / ".join(f"`{l[:160]}`" for l in v["stderr"]) or "none")
                                           for k, v in r["imports"].items()]
    L += ["", "## Behaviour (see the JSON for full detail)", "", "```", json.dumps(r["behaviour"], indent=1, default=str), "```", ""]
    return "\n".join(L)


def main() -> None:
    r = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
         "command": "/tmp/qvenv/bin/python bench/nf4_choice.py",
         "versions": {p: metadata.version(p) for p in ("torch", "torchao", "bitsandbytes", "safetensors")},
         "machine": {"cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
                     "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                     "platform": platform.platform(), "cuda_available": torch.cuda.is_available()},
         "imports": {"torchao": import_warnings("import torchao.quantization"),
                     "bitsandbytes": import_warnings("import bitsandbytes")},
         "accuracy": {}, "speed": {}}
    for step in (accuracy_and_size, behaviour, speed):
        try:
            r = step(r)
        except Exception:                                                 # noqa: BLE001
            r[step.__name__ + "_error"] = traceback.format_exc()
        print(f"done: {step.__name__}", flush=True)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "nf4_choice.json").write_text(json.dumps(r, indent=1, default=str))
    (out / "nf4_choice.md").write_text(markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
