"""What the tests share: small random-weight models built from configs (nothing is
downloaded), a tokenizer trained here, and a LoRA written by hand as a tutorial would."""

from __future__ import annotations

import math

import torch
from torch import nn


def tiny_llama(seed: int = 0, hidden_size: int = 64, vocab_size: int = 128):
    """A Llama with grouped-query attention: 4 query heads share 2 key/value heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                         max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128)
    return GPT2LMHeadModel(config).eval()


TINY_DECODER_EXTRAS = {
    # Gemma's head_dim defaults to 256; a soft-cap of 2 bends the logits hard, so a loss that
    # ignored it would show.
    "gemma2": dict(head_dim=16, final_logit_softcapping=2.0, attn_implementation="eager"),
    "gemma3_text": dict(head_dim=16, final_logit_softcapping=2.0, sliding_window=8),
    "granite": dict(logits_scaling=4.0),
}


def tiny_decoder(model_type: str, seed: int = 0, vocab_size: int = 128):
    """A 2-layer causal LM of ``model_type`` (transformers' ``AutoModelForCausalLM`` of its
    config), hidden 64, vocab 128 unless told, with ``TINY_DECODER_EXTRAS`` where the type needs them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                                  max_position_embeddings=128, **TINY_DECODER_EXTRAS.get(model_type, {}))
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, vocab_size=128, max_position_embeddings=128)
    return BertModel(config).eval()


def tiny_reference(seed: int = 0):
    from peftkit.models import ReferenceConfig, ReferenceDecoder

    torch.manual_seed(seed)
    return ReferenceDecoder(ReferenceConfig(hidden_size=64, num_layers=2, num_heads=4,
                                            intermediate_size=128, max_positions=128)).eval()


def tiny_bert_classifier(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=128, max_position_embeddings=128, num_labels=2)
    return BertForSequenceClassification(config).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "reference": tiny_reference}


def randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every adapter parameter a random value, so that the adapter changes the output
    (at init LoRA's B, or an embedding LoRA's A, is zero)."""
    from peftkit.methods.base import adapter_modules

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in adapter_modules(model):
            for _, param in module.adapter_parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def model_output(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def tiny_tokenizer():
    """A small BPE tokenizer trained here on a few sentences (vocabulary under 128, so it
    fits the tiny models); nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = ["ada has 3 cups and 4 hats, 7 things.", "the movie was good", "the movie was bad",
            "bo had 9 eggs and gave 2, 7 left.", "0 1 2 3 4 5 6 7 8 9 yes no fresh rotten"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator(text, trainer)
    # Like Llama's tokenizer: a BOS token starts every encoded text.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def save_transformers_folder(model, folder):
    """Write ``model`` and the tiny tokenizer as a local transformers folder (safetensors)."""
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


class HandLora(nn.Module):
    """Frozen W plus trainable A, B, as a tutorial writes LoRA; ``alpha`` and ``r`` are
    stored, and knobs plant mistakes: ``zero_b=False`` (M2), ``scale=False`` (M3, alpha
    stored but ignored), ``freeze=False`` (M1)."""

    def __init__(self, linear: nn.Linear, r: int, alpha: float, *, zero_b=True, scale=True, freeze=True):
        super().__init__()
        self.linear = linear.requires_grad_(not freeze)
        self.A = nn.Parameter(torch.randn(r, linear.in_features) / math.sqrt(linear.in_features))
        self.B = nn.Parameter(torch.zeros(linear.out_features, r) if zero_b else torch.randn(linear.out_features, r))
        self.alpha, self.r, self.scale = alpha, r, scale

    def forward(self, x):
        s = self.alpha / self.r if self.scale else 1.0
        return self.linear(x) + s * (x @ self.A.t() @ self.B.t())


def tied_llama_folder(folder):
    """A tiny Llama saved as a transformers folder, its head its embedding (one tied tensor),
    rotary tables as buffers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
                         tie_word_embeddings=True)
    return save_transformers_folder(LlamaForCausalLM(config).eval(), folder)


def write_jsonl(path, rows):
    """Write ``rows`` (dicts) as a JSONL file; returns ``path``."""
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference_run_inputs(root):
    """(model folder, data file) for a quick ``peftkit train``: a tiny reference decoder and 24
    prompt/completion examples of the demo's task B."""
    from peftkit.pretrain import task_lines

    tiny_reference().save_pretrained(root / "reference")
    rows = [{"prompt": line.rsplit(",", 1)[0] + ",", "completion": line.rsplit(",", 1)[1]}
            for line in task_lines("B", 24, 0)]
    return root / "reference", write_jsonl(root / "data.jsonl", rows)


class Killed(BaseException):
    """Stands in for kill -9 of a `peftkit train` run (a BaseException, so no handler eats it)."""


def train_killed_after(monkeypatch, step: int, argv: list[str]) -> None:
    """Run ``peftkit train argv`` in process and stop it right after ``step`` is logged, as a
    kill would: the checkpoints written so far stay, no adapter is written."""
    import pytest

    import peftkit.runs as runs
    from peftkit.cli import main

    real_train = runs.train

    def dying(*args, on_step, **kwargs):
        def logged(record):
            on_step(record)
            if record["step"] == step:
                raise Killed
        return real_train(*args, on_step=logged, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(runs, "train", dying)
        with pytest.raises(Killed):
            main(argv)
