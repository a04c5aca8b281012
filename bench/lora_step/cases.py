"""The cases, their fixed settings and design targets, and what a worker process does: build
one case's model and time its training step."""

from __future__ import annotations

import statistics
import time

from bench import harness

REFERENCE_CASES = ["full", "floor"]
LORA_CASES = ["peft-qv", "peft-all-linear", "peftkit-qv", "peftkit-all-linear",
              "peftkit-qv-own-loss", "peftkit-all-linear-own-loss"]
# A peftkit case ending in this trains on the model's own loss (``pm(**batch).loss``, as a
# transformers Trainer computes it) instead of peftkit's fused one: the LoRA layers alone.
OWN_LOSS = "-own-loss"
METHOD_CASES = [
    "peft-prefix", "peft-prompt",
    "peftkit-adapter-pfeiffer", "peftkit-adapter-houlsby", "peftkit-prefix", "peftkit-prompt",
]
CASES = REFERENCE_CASES + LORA_CASES + METHOD_CASES
# Names accepted by --cases besides the case names; each includes full and floor.
CASE_GROUPS = {
    "all": CASES,
    "lora": REFERENCE_CASES + LORA_CASES,
    "methods": REFERENCE_CASES + METHOD_CASES,
}
QV_TARGETS = ["q_proj", "v_proj"]

# The Hugging Face PEFT case each peftkit case is compared with (same method and
# settings). Bottleneck adapters have none: PEFT doesn't implement them.
PEFT_COUNTERPART = {
    "peftkit-qv": "peft-qv",
    "peftkit-all-linear": "peft-all-linear",
    "peftkit-prefix": "peft-prefix",
    "peftkit-prompt": "peft-prompt",
    "peftkit-qv-own-loss": "peft-qv",
    "peftkit-all-linear-own-loss": "peft-all-linear",
}

MODEL_CONFIG = dict(
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    intermediate_size=1408,
    vocab_size=32000,
    max_position_embeddings=512,
)
BATCH, SEQ_LEN = 4, 256
LR = 1e-4
SEED = 0
ATTN_IMPLEMENTATION = "sdpa"
LORA = dict(r=8, alpha=16, dropout=0.0)
ADAPTER = dict(bottleneck=64)  # placement from the case name: pfeiffer or houlsby
NUM_VIRTUAL_TOKENS = 20  # prefix and prompt tuning

# Design targets (issue 21): (case, reference case, metric, max ratio). Step times are
# compared round by round (the median of the per-round ratios), memory from fresh processes.
TARGETS = [
    ("peftkit-qv", "floor", "step", 1.02),
    ("peftkit-all-linear", "floor", "step", 1.05),
    ("peftkit-qv", "peft-qv", "step", 1.00),
    ("peftkit-all-linear", "peft-all-linear", "step", 0.90),
    ("peftkit-qv", "peft-qv", "peak_rss_mb", 1.00),
    ("peftkit-all-linear", "peft-all-linear", "peak_rss_mb", 0.85),
    ("peftkit-prefix", "peft-prefix", "step", 1.00),
    ("peftkit-prompt", "peft-prompt", "step", 1.00),
    ("peftkit-prefix", "peft-prefix", "peak_rss_mb", 1.00),
    ("peftkit-prompt", "peft-prompt", "peak_rss_mb", 1.00),
]
# Cases that do all of the floor's work and more: a ratio below 1.0 to it is a measurement error.
ABOVE_FLOOR = ["full", "peft-qv", "peft-all-linear", "peftkit-qv", "peftkit-all-linear",
               "peftkit-qv-own-loss", "peftkit-all-linear-own-loss"]


def build_model():
    """The seeded random-weight Llama every case starts from, in training mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODEL_CONFIG, use_cache=False, attn_implementation=ATTN_IMPLEMENTATION)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.train()
    return model


def make_batch():
    import torch

    gen = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(0, MODEL_CONFIG["vocab_size"], (BATCH, SEQ_LEN), generator=gen)


def trainable(params) -> list:
    return [p for p in params if p.requires_grad]


def own_loss(model, batch):
    """The model's own loss (``model(**batch).loss``): what a PEFT model trains on."""
    return model(**batch).loss


def peftkit_loss(model, batch):
    """The loss ``peftkit train`` trains on: fused, without the whole logits, where it can
    (``peftkit.lm_loss.training_loss``)."""
    return _lm_loss().training_loss(model, batch)


def _lm_loss():
    harness.import_peftkit()
    from peftkit import lm_loss

    return lm_loss


def lm_step_fn(model, params, ids, loss_of=own_loss):
    """The standard training step: zero_grad + forward + backward + AdamW step, the loss
    taken by ``loss_of(model, batch)``."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=LR)
    batch = {"input_ids": ids, "labels": ids}

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model, batch)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def floor_step_fn(model, ids):
    """Forward + backward through a fully frozen model, down to what the lowest LoRA layer
    needs: the outputs of the first layer's q and v projections are made leaves that require
    grad, so the backward computes every activation gradient above them and nothing below
    (LoRA never needs the gradient of the first layer's input, nor of the embeddings). Any
    LoRA on q, v (or more) does all of this plus its own work, so a ratio below 1.0 to it is
    a measurement error. The loss is peftkit's fused one (``lm_loss.backbone_loss``, the
    logits never whole): the cheapest loss any LoRA can train on. No optimiser step (nothing
    to update)."""
    lm_loss = _lm_loss()
    for p in model.parameters():
        p.requires_grad_(False)
    attention = model.model.layers[0].self_attn

    def leaf(module, inputs, output):
        return output.detach().requires_grad_()

    for projection in (attention.q_proj, attention.v_proj):
        projection.register_forward_hook(leaf)

    batch = {"input_ids": ids, "labels": ids}

    def step() -> float:
        loss = lm_loss.backbone_loss(lm_loss.FusedParts(model.model, model.lm_head), batch)
        loss.backward()
        return loss.item()

    return step


def peft_config(method: str):
    """Hugging Face PEFT's config for a ``peft-<method>`` case."""
    import peft

    if method in ("qv", "all-linear"):
        return peft.LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
            target_modules=QV_TARGETS if method == "qv" else "all-linear",
        )
    if method == "prefix":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS)
    if method == "prompt":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS)
    raise ValueError(f"no PEFT case for {method!r}")


def peft_model(model, method: str):
    import peft

    return peft.get_peft_model(model, peft_config(method))


def peftkit_config(method: str):
    """peftkit's config for a ``peftkit-<method>`` case."""
    import peftkit

    if method in ("qv", "all-linear"):
        return peftkit.LoraConfig(
            r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
            target_modules=QV_TARGETS if method == "qv" else "all-linear",
        )
    if method.startswith("adapter-"):
        return peftkit.AdapterConfig(bottleneck=ADAPTER["bottleneck"], placement=method.removeprefix("adapter-"))
    if method == "prefix":
        return peftkit.PrefixConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS)
    if method == "prompt":
        return peftkit.PromptConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS)
    raise ValueError(f"no peftkit case for {method!r}")


def peftkit_model(model, method: str):
    peftkit = harness.import_peftkit()
    return peftkit.attach(model, peftkit_config(method))


def setup_case(case: str, ids):
    """Build the model for ``case``; return (step function, trainable parameter count)."""
    model = build_model()
    if case == "floor":
        return floor_step_fn(model, ids), 0
    if case == "full":
        wrapped = model
    else:
        library, _, method = case.removesuffix(OWN_LOSS).partition("-")
        wrapped = peft_model(model, method) if library == "peft" else peftkit_model(model, method)
    params = trainable(wrapped.parameters())
    loss_of = peftkit_loss if case.startswith("peftkit-") and not case.endswith(OWN_LOSS) else own_loss
    return lm_step_fn(wrapped, params, ids, loss_of), sum(p.numel() for p in params)


def step_clock(threads: int):
    """The clock a step is timed with: on one thread the CPU time of this thread (other
    processes' load does not count), else the wall clock (torch's worker threads do work
    that the calling thread's CPU time does not see)."""
    return time.thread_time if threads == 1 else time.perf_counter


def time_interleaved(cases: list[str], warmup: int, rounds: int, threads: int, tuned_malloc: bool) -> dict:
    """Every case built in this one process, each warmed up, then ``rounds`` rounds of one
    step per case, the order reversed every round, so a drift of the machine's speed falls on
    every case alike. ``tuned_malloc``: glibc's allocator as ``peftkit train`` sets it
    (``peftkit.allocator``), before anything is built. Returns seconds per case, round by round."""
    import torch

    peftkit = harness.import_peftkit()
    from peftkit.allocator import tune_for_training

    tuned = tune_for_training() if tuned_malloc else False
    torch.set_num_threads(threads)
    ids = make_batch()
    steps, trainable_counts, errors = {}, {}, {}
    for case in cases:
        try:
            steps[case], trainable_counts[case] = setup_case(case, ids)
            for _ in range(warmup):
                steps[case]()
        except Exception as exc:  # a case that cannot run is an error row; the others go on
            errors[case] = f"{type(exc).__name__}: {exc}"
            steps.pop(case, None)
    clock = step_clock(threads)
    losses = {}

    def stepping(case):
        def step():
            losses[case] = steps[case]()
        return step

    # Warmed up above, case by case, so that a case that fails is an error row.
    seconds = harness.time_cases({case: stepping(case) for case in steps}, rounds, 0, {"step": clock})["step"]
    return {"seconds": seconds, "trainable_params": trainable_counts, "final_loss": losses, "errors": errors,
            "clock": clock.__name__, "malloc_tuned": tuned, "torch_threads": torch.get_num_threads(),
            "peftkit_version": peftkit.__version__, "peft_version": harness.package_version("peft")}


def time_steps(step, warmup: int, steps: int) -> tuple[list[float], float]:
    """Run ``warmup`` untimed steps, then ``steps`` timed ones; return (seconds, last loss)."""
    loss = float("nan")
    for _ in range(warmup):
        loss = step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    return times, loss


def run_case(case: str, warmup: int, steps: int, threads: int, tuned_malloc: bool = False) -> dict:
    """Measure one case in this process (its peak memory belongs to it alone); the result is
    a JSON-able dict."""
    import torch
    import transformers  # noqa: F401  (imported here so rss_after_import counts it)

    harness.import_peftkit()
    from peftkit.allocator import tune_for_training

    tuned = tune_for_training() if tuned_malloc else False
    torch.set_num_threads(threads)
    rss_after_import = harness.peak_rss_mb()
    ids = make_batch()
    step, n_trainable = setup_case(case, ids)
    rss_after_setup = harness.peak_rss_mb()
    times, loss = time_steps(step, warmup, steps)
    return {
        "case": case,
        "library_version": harness.library_version(case),
        "trainable_params": n_trainable,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "step_s": times,
        "peak_rss_mb": harness.peak_rss_mb(),
        "rss_after_import_mb": rss_after_import,
        "rss_after_setup_mb": rss_after_setup,
        "final_loss": loss,
        "torch_threads": torch.get_num_threads(),
        "malloc_tuned": tuned,
    }


def worker_main(case: str, warmup: int, steps: int, threads: int, tuned_malloc: bool) -> int:
    """Subprocess entry point for one case's memory: print one marked JSON line, success or error."""
    return harness.emit_result(lambda: run_case(case, warmup, steps, threads, tuned_malloc), {"case": case})


def timing_worker_main(cases: list[str], warmup: int, rounds: int, threads: int, tuned_malloc: bool) -> int:
    """Subprocess entry point for the interleaved timing of ``cases``: one marked JSON line."""
    return harness.emit_result(lambda: time_interleaved(cases, warmup, rounds, threads, tuned_malloc),
                               {"case": ",".join(cases)})
