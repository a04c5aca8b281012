"""Training in half precision on the CPU (issue 17, item 1): a bfloat16 or float16 base with
float32 adapters, under autocast, for every method; the float16 gradient scaler; the device
and dtype checks.

Tolerances: bfloat16 rounds each value to 8 mantissa bits (relative 2⁻⁸ ≈ 0.4%); a layer's
output or gradient sums many such values, so its error relative to the float64 formula stays
within a few times that — 3% of the norm is met by bf16 and missed by a wrong formula.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_gpt2, tiny_llama, tiny_reference

import peftkit
from peftkit.precision import Precision, PrecisionError, base_dtype, dtype_named, place, resolve_device, resolve_dtype
from peftkit.train import train
from peftkit.train_checkpoints import checkpoint_paths

TOLERANCE = 3e-2

CONFIGS = {
    "lora": lambda: peftkit.LoraConfig(r=4, target_modules="all-linear"),
    "adapter": lambda: peftkit.AdapterConfig(bottleneck=8),
    "prefix": lambda: peftkit.PrefixConfig(num_virtual_tokens=4),
    "prompt": lambda: peftkit.PromptConfig(num_virtual_tokens=4),
}


def _batches(count: int = 3, vocab: int = 128):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (2, 10), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_method_trains_on_a_half_precision_base_with_float32_adapters(method, dtype):
    model = place(tiny_reference(), torch.device("cpu"), dtype)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pm = peftkit.attach(model, CONFIGS[method]())
    trainable = pm.trainable_parameters()
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert base_dtype(pm) == dtype and Precision.of(pm).autocast_dtype == dtype
    before = {n: p.detach().clone() for n, p in trainable.items()}
    batches = _batches()
    losses = train(pm, batches, steps=6, lr=1e-2, progress=False).losses
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(before[n], p) for n, p in trainable.items())  # the adapters moved
    assert all(p.dtype == torch.float32 for p in trainable.values())
    for name, param in pm.base_model.named_parameters():  # the base did not
        if name in frozen_before:
            assert param.dtype == dtype and torch.equal(param, frozen_before[name]), name
    # The trained model computes in the base's dtype, outside autocast too.
    with torch.no_grad():
        logits = pm(input_ids=batches[0]["input_ids"]).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_adapter_dtype_none_keeps_the_bases_dtype_and_float32_bases_are_untouched():
    bf16 = place(tiny_reference(), torch.device("cpu"), torch.bfloat16)
    pm = peftkit.attach(bf16, CONFIGS["lora"](), adapter_dtype=None)
    assert all(p.dtype == torch.bfloat16 for p in pm.trainable_parameters().values())
    float64 = tiny_reference().double()
    pm64 = peftkit.attach(float64, CONFIGS["adapter"]())  # float32 applies to half bases only
    assert all(p.dtype == torch.float64 for p in pm64.trainable_parameters().values())


def test_lora_on_a_bf16_base_under_autocast_matches_the_float64_formula():
    """W in bfloat16, A and B in float32, computed under autocast: output and gradients
    within 3% of y = x Wᵀ + s B A x in float64 from the same (bf16-rounded) weights."""
    torch.manual_seed(0)
    model = place(torch.nn.Sequential(torch.nn.Linear(64, 48)), torch.device("cpu"), torch.bfloat16)
    pm = peftkit.attach(model, peftkit.LoraConfig(r=4, alpha=8, target_modules=["0"]))
    layer = pm.base_model[0]
    with torch.no_grad():
        layer.lora_B["default"].normal_(0, 0.2)
    x = torch.randn(16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pm(x.bfloat16())
    y.float().pow(2).sum().backward()
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    w, bias = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    y64 = x.double() @ w.t() + bias + 2.0 * (x.double() @ a64.t()) @ b64.t()
    y64.pow(2).sum().backward()
    assert y.dtype == torch.bfloat16 and a.grad.dtype == b.grad.dtype == torch.float32
    assert _relative_error(y.detach(), y64.detach()) < TOLERANCE
    assert _relative_error(a.grad, a64.grad) < TOLERANCE
    assert _relative_error(b.grad, b64.grad) < TOLERANCE
    assert layer.base_layer.weight.grad is None


def _our_name(peft_name: str) -> str:
    """PEFT's "base_model.model.<path>.lora_A.default.weight" is peftkit's
    "base_model.<path>.lora_A.default" (a ParameterDict entry, no ".weight")."""
    return "base_model." + peft_name.removeprefix("base_model.model.").removesuffix(".weight")


def test_lora_in_bf16_matches_hugging_face_peft_in_the_same_precision():
    """The same bf16 Llama, the same float32 A and B, under bf16 autocast: peftkit's logits
    and A/B gradients against PEFT's (whose autocast_adapter_dtype also keeps them float32)."""
    peft = pytest.importorskip("peft")
    ours_model = place(tiny_llama(), torch.device("cpu"), torch.bfloat16)
    theirs_model = place(tiny_llama(), torch.device("cpu"), torch.bfloat16)
    targets = ["q_proj", "v_proj"]
    ours = peftkit.attach(ours_model, peftkit.LoraConfig(r=4, alpha=8, target_modules=targets))
    theirs = peft.get_peft_model(theirs_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                               lora_dropout=0.0))
    gen = torch.Generator().manual_seed(3)
    ours_params = dict(ours.named_parameters())
    theirs_params = {n: p for n, p in theirs.named_parameters() if "lora_" in n}
    assert theirs_params and all(p.dtype == torch.float32 for p in theirs_params.values())
    with torch.no_grad():
        for name, param in theirs_params.items():
            value = torch.randn(param.shape, generator=gen) * 0.05
            param.copy_(value)
            ours_params[_our_name(name)].copy_(value)
    ids = torch.randint(0, 128, (2, 12), generator=gen)
    grads = []
    for model in (ours, theirs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads.append((out.logits.detach().float(), out.loss.item()))
    (ours_logits, ours_loss), (theirs_logits, theirs_loss) = grads
    assert _relative_error(ours_logits, theirs_logits.double()) < TOLERANCE
    assert ours_loss == pytest.approx(theirs_loss, rel=1e-2)
    for name, param in theirs_params.items():
        mine = ours_params[_our_name(name)]
        assert mine.grad.dtype == torch.float32
        assert _relative_error(mine.grad, param.grad.double()) < TOLERANCE, name


def test_float16_overflow_skips_the_step_through_the_scaler_instead_of_stopping():
    pm = peftkit.attach(place(tiny_reference(), torch.device("cpu"), torch.float16), CONFIGS["lora"]())
    scaler = Precision.of(pm).grad_scaler()
    assert scaler is not None and Precision(torch.device("cpu"), torch.bfloat16).grad_scaler() is None
    records = []
    # A first loss scale of 2^40 overflows float16 gradients at once: the scaler skips that step,
    # shrinks the scale, and the run goes on to train.
    original = torch.amp.GradScaler.__init__

    def huge_scale(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "init_scale": 2.0 ** 40})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.amp.GradScaler, "__init__", huge_scale)
        result = train(pm, _batches(), steps=30, lr=1e-2, progress=False, on_step=records.append)
    assert result.skipped_steps >= 1 and records[0].get("skipped")
    assert result.skipped_steps < 30 and any(not r.get("skipped") for r in records)
    assert all(torch.isfinite(p).all() for p in pm.trainable_parameters().values())


def test_a_killed_float16_run_resumes_to_the_same_adapter_and_loss_scale(tmp_path, monkeypatch):
    """Dropout draws and the scaler's loss scale both come back from the checkpoint. The first
    scale, 2^22, overflows for a few steps: the scale the checkpoint holds is one the run itself
    cut, and a resumed run that started again from 2^22 would skip steps the first one took."""
    class Killed(Exception):
        pass

    original = torch.amp.GradScaler.__init__
    monkeypatch.setattr(torch.amp.GradScaler, "__init__",
                        lambda self, *a, **k: original(self, *a, **{**k, "init_scale": 2.0 ** 22}))

    def run(folder, seed=0, kill_at=None, resume=False):
        torch.manual_seed(seed)
        pm = peftkit.attach(place(tiny_reference(), torch.device("cpu"), torch.float16),
                            peftkit.LoraConfig(r=4, dropout=0.1, target_modules="all-linear"))

        def on_step(record):
            if record["step"] == kill_at:
                raise Killed

        try:
            train(pm, _batches(), steps=10, lr=1e-2, progress=False, checkpoint_dir=tmp_path / folder,
                  checkpoint_every=2, resume=resume, on_step=on_step)
        except Killed:
            pass
        return {n: p.detach().clone() for n, p in pm.trainable_parameters().items()}

    whole = run("a")
    run("b", kill_at=9)
    state = torch.load(checkpoint_paths(tmp_path / "b")[-1] / "state.pt", weights_only=True)
    assert 0 < state["grad_scaler"]["scale"] < 2.0 ** 22 and 1 <= state["skipped_steps"] < state["step"]
    resumed = run("b", seed=123, resume=True)
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=0)


def test_place_keeps_tied_weights_tied():
    model = place(tiny_gpt2(), torch.device("cpu"), torch.bfloat16)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_devices_and_dtypes_that_are_not_there_are_refused_with_the_fix():
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(PrecisionError, match="no CUDA GPU.*--device cpu"):
            resolve_device("cuda")
        with pytest.raises(PrecisionError, match="no CUDA GPU"):
            resolve_device("cuda:1")
    if not torch.backends.mps.is_available():
        with pytest.raises(PrecisionError, match="MPS.*--device cpu"):
            resolve_device("mps")
    with pytest.raises(PrecisionError, match="not a device.*auto, cpu, cuda"):
        resolve_device("gpu0")
    with pytest.raises(PrecisionError, match="not supported"):
        resolve_device("meta")
    with pytest.raises(PrecisionError, match="not one of float32, bfloat16, float16"):
        dtype_named("int8")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_peftkit_train_in_bfloat16_reports_its_precision(tmp_path, capsys):
    from helpers import reference_run_inputs

    from peftkit import cli

    model, data = reference_run_inputs(tmp_path)
    assert cli.main(["train", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "run"),
                     "--max-steps", "2", "--dtype", "bfloat16", "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "cpu, base in bfloat16" in out.out
    assert "doctor note" not in out.err  # every probe ran on the mixed-precision model
    import json
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["options"]["dtype"] == "bfloat16" and run["options"]["adapter_dtype"] == "float32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_peftkit_train_on_a_gpu_that_is_not_there_fails_before_anything_is_written(tmp_path, capsys):
    from helpers import reference_run_inputs

    from peftkit import cli

    model, data = reference_run_inputs(tmp_path)
    out = tmp_path / "run"
    assert cli.main(["train", "--model", str(model), "--data", str(data), "--out", str(out),
                     "--device", "cuda", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "--device cpu" in err and "Traceback" not in err
    assert not out.exists()


def test_float16_with_float16_trainable_weights_is_refused_with_the_fix():
    pm = peftkit.attach(place(tiny_reference(), torch.device("cpu"), torch.float16), CONFIGS["lora"](),
                        adapter_dtype=None)
    with pytest.raises(ValueError, match="needs float32 trainable weights.*--adapter-dtype float32"):
        train(pm, _batches(), steps=1, lr=1e-2, progress=False)


def test_float16_gradients_that_never_stop_overflowing_stop_the_run(monkeypatch):
    """A scaler can only fix an overflow of its own making: gradients that stay infinite (here a
    hook makes them so) stop the run after MAX_SKIPPED_IN_A_ROW skips, as float32 and bfloat16
    runs stop at the first, with nothing applied and the log showing grad_norm null."""
    from peftkit.train import MAX_SKIPPED_IN_A_ROW, NonFiniteError

    pm = peftkit.attach(place(tiny_reference(), torch.device("cpu"), torch.float16), CONFIGS["lora"]())
    before = {n: p.detach().clone() for n, p in pm.trainable_parameters().items()}
    for param in pm.trainable_parameters().values():
        param.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    records = []
    with pytest.raises(NonFiniteError, match=f"overflowed {MAX_SKIPPED_IN_A_ROW} steps in a row"):
        train(pm, _batches(), steps=MAX_SKIPPED_IN_A_ROW + 5, lr=1e-2, progress=False, on_step=records.append)
    assert all(torch.equal(before[n], p) for n, p in pm.trainable_parameters().items())
    assert records and all(r["grad_norm"] is None and r["skipped"] for r in records)
