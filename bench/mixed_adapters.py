"""Mixed-adapter batches (``adapter_names``): inference time, peftkit vs Hugging Face PEFT.

A random-weight Llama (hidden 256, 4 layers, float32, CPU) carrying four LoRA adapters (r ``--r``
on ``--targets``), in eval mode under ``torch.no_grad``, timed two ways: ``forward``, one batch of
``--rows`` rows x ``--tokens`` tokens (``use_cache=False``); ``generate``, greedy decoding of
exactly ``--new-tokens`` tokens after prompts of ``--prompt-tokens`` for the same rows (KV cache,
so each step after the first is a batch of one token per row, where per-layer overheads weigh
most). Cases, in each:

- ``base``: the plain model, no adapter (the floor: no mixed batch can be faster);
- ``peftkit-single`` / ``peft-single``: every row with adapter "a" (the active one);
- ``peftkit-mixed`` / ``peft-mixed``: the rows split evenly over the four adapters in
  consecutive blocks (a a b b c c d d for 8 rows), ``model(input_ids, adapter_names=...)``;
- ``peftkit-mixed-interleaved`` / ``peft-mixed-interleaved``: the same split, row by row
  (a b c d a b c d), so no adapter's rows are consecutive.

The same weights run in both libraries: the adapters are made in peftkit with random A and B,
saved (peftkit writes PEFT's layout) and read back with ``peft.PeftModel.from_pretrained`` +
``load_adapter`` onto a copy of the same base. Before timing, every row of each mixed batch is
checked against its adapter run alone, and PEFT's mixed logits and greedy tokens against peftkit's.

Timing, in one process: every case built, ``--warmup`` untimed calls each, then ``--rounds``
rounds of one call per case, the order reversed every round; min and median per case, and
each ratio taken round by round (case / reference of the same round), its median reported.

    python -m bench.mixed_adapters                       # writes bench/results/mixed_adapters.{json,md}
    python -m bench.mixed_adapters --rounds 2 --warmup 1 --out-dir /tmp/m     # smoke
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import harness

COMMAND = "python -m bench.mixed_adapters"
ADAPTERS = ("a", "b", "c", "d")
CASES = ("base", "peftkit-single", "peftkit-mixed", "peftkit-mixed-interleaved",
         "peft-single", "peft-mixed", "peft-mixed-interleaved")
# (case, reference, target: case / reference at most this); None: reported, no target.
RATIOS = (("peftkit-mixed", "peftkit-single", 1.2), ("peftkit-mixed", "peft-mixed", 0.8),
          ("peftkit-mixed-interleaved", "peftkit-single", 1.2),
          ("peftkit-mixed-interleaved", "peft-mixed-interleaved", 0.8),
          ("peftkit-single", "base", None), ("peftkit-mixed", "base", None), ("peft-single", "base", None),
          ("peft-mixed", "base", None), ("peft-mixed", "peft-single", None), ("peftkit-single", "peft-single", None))


def build_base(vocab: int, tokens: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=tokens,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def build_models(args, folder: Path):
    """(plain base, peftkit model, PEFT model): the same base weights, the same four adapters."""
    import peft
    import torch

    peftkit = harness.import_peftkit()
    base = build_base(args.vocab, args.tokens)
    plain, for_peft = copy.deepcopy(base), copy.deepcopy(base)
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    pm = None
    generator = torch.Generator().manual_seed(1)
    for name in ADAPTERS:
        config = peftkit.LoraConfig(r=args.r, alpha=2 * args.r, target_modules=targets)
        pm = peftkit.attach(pm or base, config, name)
        with torch.no_grad():
            for _, role, param in pm.adapter_parameters([name]):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        pm.save(folder / name, name)
    pm.set_adapter("a")
    pm.eval()
    pp = peft.PeftModel.from_pretrained(for_peft, str(folder / "a"), adapter_name="a")
    for name in ADAPTERS[1:]:
        pp.load_adapter(str(folder / name), adapter_name=name)
    pp.set_adapter("a")
    pp.eval()
    return plain, pm, pp


def row_names(rows: int, interleaved: bool) -> list[str]:
    """The rows split evenly over the four adapters: in blocks, or one by one."""
    if interleaved:
        return [ADAPTERS[i % len(ADAPTERS)] for i in range(rows)]
    return [ADAPTERS[i * len(ADAPTERS) // rows] for i in range(rows)]


def check_outputs(pm, pp, ids, prompts, generate, blocks, interleaved) -> dict:
    """Largest |difference| of the logits: each mixed row against its adapter alone (peftkit),
    and PEFT's mixed batch against peftkit's; and whether the greedy tokens agree the same ways."""
    import torch

    out = {}
    with torch.no_grad():
        alone, alone_tokens = {}, {}
        for name in ADAPTERS:
            pm.set_adapter(name)
            alone[name], alone_tokens[name] = pm(input_ids=ids).logits, generate(pm, prompts)
        pm.set_adapter("a")
        for label, names in (("blocks", blocks), ("interleaved", interleaved)):
            mixed = pm(input_ids=ids, adapter_names=names).logits
            out[f"peftkit_rows_vs_alone_{label}"] = max(
                (mixed[i] - alone[n][i]).abs().max().item() for i, n in enumerate(names))
            out[f"peft_vs_peftkit_{label}"] = (pp(input_ids=ids, adapter_names=names).logits - mixed).abs().max().item()
            tokens = generate(pm, prompts, adapter_names=names)
            out[f"peftkit_tokens_equal_alone_{label}"] = all(
                torch.equal(tokens[i], alone_tokens[n][i]) for i, n in enumerate(names))
            out[f"peft_tokens_equal_peftkit_{label}"] = torch.equal(generate(pp, prompts, adapter_names=names), tokens)
    return out


def summary(seconds: dict[str, list[float]]) -> dict:
    """Min and median per case, and each ratio of ``RATIOS`` round by round."""
    out = harness.round_summary(seconds, RATIOS)
    # peftkit's mixed batch can be no faster than the base model alone: its best ratio to PEFT's.
    floor = {label: statistics.median(b / p for b, p in zip(seconds["base"], seconds[f"peft-{label}"]))
             for label in ("mixed", "mixed-interleaved")}
    return {**out, "floor_over_peft": floor}


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), harness.load_average()
    with tempfile.TemporaryDirectory() as folder:
        plain, pm, pp = build_models(args, Path(folder))
    draw = torch.Generator().manual_seed(2)
    ids = torch.randint(0, args.vocab, (args.rows, args.tokens), generator=draw)
    prompts = torch.randint(1, args.vocab, (args.rows, args.prompt_tokens), generator=draw)
    blocks, interleaved = row_names(args.rows, False), row_names(args.rows, True)

    def generate(model, prompt, **kwargs):
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              eos_token_id=None, pad_token_id=0, **kwargs)

    checks = check_outputs(pm, pp, ids, prompts, generate, blocks, interleaved)
    models = {"base": (plain, None), "peftkit-single": (pm, None), "peftkit-mixed": (pm, blocks),
              "peftkit-mixed-interleaved": (pm, interleaved), "peft-single": (pp, None),
              "peft-mixed": (pp, blocks), "peft-mixed-interleaved": (pp, interleaved)}
    mixing = {case: {} if names is None else {"adapter_names": names} for case, (_, names) in models.items()}
    forward = {case: (lambda m=m, k=mixing[case]: m(input_ids=ids, use_cache=False, **k))
               for case, (m, _) in models.items()}
    decode = {case: (lambda m=m, k=mixing[case]: generate(m, prompts, **k)) for case, (m, _) in models.items()}
    with torch.no_grad():
        timed = {"forward": harness.time_cases(forward, args.rounds, args.warmup)["wall"],
                 "generate": harness.time_cases(decode, args.rounds, args.warmup)["wall"]}
    sections = {title: summary(seconds) for title, seconds in timed.items()}
    return {
        "date": harness.utc_now(), "command": " ".join([COMMAND, *sys.argv[1:]]),
        "machine": harness.machine_info(args.threads), "loadavg_before": load_before,
        "loadavg_after": harness.load_average(),
        "setup": {"rows": args.rows, "tokens": args.tokens, "prompt_tokens": args.prompt_tokens,
                  "new_tokens": args.new_tokens, "vocab": args.vocab, "r": args.r, "alpha": 2 * args.r,
                  "targets": args.targets, "rounds": args.rounds, "warmup": args.warmup, "threads": args.threads,
                  "model": "LlamaForCausalLM hidden 256, 4 layers, 4 heads, intermediate 688, vocab "
                           f"{args.vocab} (tied), random weights, float32, sdpa, eval mode, torch.no_grad",
                  "blocks": blocks, "interleaved": interleaved},
        "checks": checks, **sections, "wall_s": time.perf_counter() - started,
    }


def section_lines(title: str, section: dict) -> list[str]:
    lines = [f"## {title}", "", *harness.table_head(["case", "min (ms)", "median (ms)"])]
    for row in section["results"]:
        lines.append(harness.table_row([row["case"], f"{row['min_s'] * 1e3:.1f}", f"{row['median_s'] * 1e3:.1f}"]))
    lines += ["", *harness.table_head(["ratio", "median of rounds", "of the minima", "target", "<met"])]
    for r in section["ratios"]:
        target = "–" if r["target"] is None else f"≤ {r['target']:.2f}x"
        met = "–" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(harness.table_row([f"{r['case']} / {r['reference']}", f"{r['median_of_rounds']:.3f}x",
                                        f"{r['of_min']:.3f}x", target, met]))
    floor = section["floor_over_peft"]
    lines += ["", "The floor: the base model alone over PEFT's mixed batch, median of rounds, "
              f"{floor['mixed']:.3f}x (blocks), {floor['mixed-interleaved']:.3f}x (interleaved); no mixed batch "
              "can get below that ratio to PEFT's.", ""]
    return lines


def markdown(report: dict) -> str:
    s, m, c = report["setup"], report["machine"], report["checks"]
    lines = [
        "# Mixed-adapter batches: inference, peftkit vs PEFT (CPU)", "",
        f"{report['date']} · `{report['command']}` · {m['cpu_model']} ({m['cpu_count']} cores, "
        f"{s['threads']} torch threads) · torch {m['torch']} · transformers {m['transformers']} · peft {m['peft']} · "
        f"1-min load {report['loadavg_before']:.2f} before, {report['loadavg_after']:.2f} after · "
        f"{report['wall_s']:.0f} s in all", "",
        f"Model: {s['model']}. Four LoRA adapters a, b, c, d, r={s['r']} alpha={s['alpha']} on {s['targets']}, "
        "random A and B, the same weights in both libraries (saved by peftkit, read by "
        f"`PeftModel.from_pretrained` + `load_adapter`). Forward: one batch of {s['rows']} rows x {s['tokens']} "
        f"tokens, `use_cache=False`. Generate: greedy, {s['prompt_tokens']}-token prompts for the same "
        f"{s['rows']} rows, exactly {s['new_tokens']} new tokens, KV cache. "
        f"Mixed rows: blocks {' '.join(s['blocks'])}; interleaved {' '.join(s['interleaved'])}; single: every row "
        f"adapter a. {s['warmup']} warm-up calls per case, then {s['rounds']} rounds of one call per case in one "
        "process, order reversed every round.", "",
        *section_lines("Forward", report["forward"]),
        *section_lines("Generate", report["generate"]),
        "Checks before timing: largest |difference| of the logits, peftkit's mixed rows against each adapter alone "
        f"{c['peftkit_rows_vs_alone_blocks']:.1e} (blocks), {c['peftkit_rows_vs_alone_interleaved']:.1e} "
        f"(interleaved); PEFT's mixed batch against peftkit's {c['peft_vs_peftkit_blocks']:.1e} (blocks), "
        f"{c['peft_vs_peftkit_interleaved']:.1e} (interleaved). Greedy tokens of each mixed row equal to its "
        f"adapter alone: {c['peftkit_tokens_equal_alone_blocks']} (blocks), "
        f"{c['peftkit_tokens_equal_alone_interleaved']} (interleaved); PEFT's mixed tokens equal to peftkit's: "
        f"{c['peft_tokens_equal_peftkit_blocks']} (blocks), {c['peft_tokens_equal_peftkit_interleaved']} "
        "(interleaved).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8, help="rows in the batch (a multiple of 4: even split)")
    p.add_argument("--tokens", type=int, default=128, help="forward: tokens per row")
    p.add_argument("--prompt-tokens", type=int, default=32, help="generate: prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=32, help="generate: new tokens per row")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2 r)")
    p.add_argument("--targets", default="all-linear", help="'all-linear' or module names, comma-separated")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per case before the rounds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=harness.RESULTS_DIR)
    args = p.parse_args(argv)
    if args.rows % len(ADAPTERS):
        p.error(f"--rows must be a multiple of {len(ADAPTERS)}")
    report = run(args)
    harness.write_report(args.out_dir, "mixed_adapters", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
