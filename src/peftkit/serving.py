"""Whether a serving engine takes an adapter folder as it is, and what to change if not.

vLLM (``vllm serve BASE --enable-lora --lora-modules NAME=DIR``) reads a PEFT LoRA folder
with its own loader (``vllm/lora/peft_helper.py``), which refuses:

- another method than LoRA (it serves LoRA adapters only);
- ``modules_to_save`` ("vLLM only supports modules_to_save being None");
- DoRA (``use_dora``);
- a rank above the server's ``--max-lora-rank`` (default 16; it must be one of
  ``VLLM_RANKS``), ``rank_pattern`` included;
- LoRA biases unless the server loads them (``bias`` other than "none");
- LoRA on the token embeddings or the output head, which its LoRA layers do not cover.

No vLLM install is needed: the checks read ``adapter_config.json`` and the tensor names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank takes
VLLM_DEFAULT_MAX_RANK = 16
_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "lm_head", "embed_out", "output")


@dataclass(frozen=True)
class ServeProblem:
    """One reason the engine would refuse the folder, and what to do about it."""

    what: str
    fix: str


def _ranks(config: dict) -> list[int]:
    ranks = [config.get("r")] + list((config.get("rank_pattern") or {}).values())
    return [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)]


def _embedding_modules(config: dict, tensor_keys: list[str]) -> list[str]:
    """Modules of the embeddings or the output head that the adapter changes."""
    found = {key.split(".lora_embedding_")[0] for key in tensor_keys if ".lora_embedding_" in key}
    for key in tensor_keys:
        module = key.rsplit(".lora_", 1)[0] if ".lora_" in key else ""
        if module.rsplit(".", 1)[-1] in _EMBEDDING_NAMES:
            found.add(module)
    return sorted(m.removeprefix("base_model.model.") for m in found)


def vllm_problems(config: dict, tensor_keys: list[str], max_lora_rank: int = VLLM_DEFAULT_MAX_RANK) -> list[ServeProblem]:
    """Why vLLM, started with ``--max-lora-rank max_lora_rank``, would refuse an adapter
    with this ``adapter_config.json`` (``config``) and these tensor names; [] if it would not."""
    if config.get("peft_type") != "LORA":
        return [ServeProblem(f"vLLM serves LoRA adapters only, and this one is {config.get('peft_type')}.",
                             "serve it with peftkit or transformers (peftkit generate), or train a LoRA adapter.")]
    problems = []
    if config.get("modules_to_save"):
        problems.append(ServeProblem(
            f"it trains {config['modules_to_save']} in full (modules_to_save), which vLLM does not load.",
            "merge it into the base (peftkit merge) and serve the merged model, or train without modules_to_save."))
    if config.get("use_dora"):
        problems.append(ServeProblem("it is a DoRA adapter (use_dora), which vLLM does not load.",
                                     "merge it (peftkit merge) and serve the merged model, or train plain LoRA."))
    top = max(_ranks(config), default=0)
    if top > max_lora_rank:
        fitting = [r for r in VLLM_RANKS if r >= top]
        fix = (f"start vLLM with --max-lora-rank {fitting[0]}" if fitting else
               f"train with r at most {VLLM_RANKS[-1]}, vLLM's largest --max-lora-rank")
        problems.append(ServeProblem(f"its rank {top} is above --max-lora-rank {max_lora_rank}.",
                                     fix + (f", or train with r at most {max_lora_rank}." if fitting else ".")))
    if config.get("bias", "none") != "none":
        problems.append(ServeProblem(f"it trains LoRA biases (bias={config['bias']!r}), which vLLM loads only "
                                     "when started with --enable-lora-bias.",
                                     "start vLLM with --enable-lora-bias, or train with bias='none'."))
    embeddings = _embedding_modules(config, tensor_keys)
    if embeddings:
        problems.append(ServeProblem(f"it puts LoRA on the embeddings or the output head ({', '.join(embeddings)}), "
                                     "which vLLM's LoRA layers do not cover.",
                                     "merge it (peftkit merge) and serve the merged model, or train without "
                                     "those targets (the default targets leave them alone)."))
    return problems


def vllm_command(folder: str | Path, config: dict, max_lora_rank: int = VLLM_DEFAULT_MAX_RANK) -> str:
    """The ``vllm serve`` line that serves the adapter on its base."""
    rank = next((r for r in VLLM_RANKS if r >= max(_ranks(config), default=1)), VLLM_RANKS[-1])
    base = config.get("base_model_name_or_path") or "BASE"
    name = Path(folder).resolve().name
    extra = f" --max-lora-rank {max(rank, max_lora_rank)}" if max(rank, max_lora_rank) != VLLM_DEFAULT_MAX_RANK else ""
    return f"vllm serve {base} --enable-lora --lora-modules {name}={Path(folder).resolve()}{extra}"

