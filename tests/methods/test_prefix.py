"""Prefix tuning: PEFT's key/value layout with grouped-query attention, the MLP
reparameterisation and its folding, the extended mask (M11) with padded batches, generation
through the cache API, and files that move both ways with Hugging Face PEFT.

Every model is a tiny seeded random-weight model (tests/helpers.py); nothing is downloaded.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import BUILDERS, tiny_bert_classifier, tiny_llama, tiny_reference
from torch import nn
from virtual_tokens import assert_padded_batch_exact, greedy_by_recomputing, hidden, pad, rows

import peftkit
from peftkit.methods.prefix import PrefixEncoder

pytest.importorskip("transformers")

N = 4
ARCHS = ["llama", "gpt2", "bert", "reference"]
DECODERS = ["llama", "gpt2", "reference"]


pytestmark = pytest.mark.usefixtures("one_thread")


def prefixed(arch: str, seed: int = 0, **config) -> peftkit.PeftModel:
    model = BUILDERS[arch](seed)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = None  # generate the full length in comparisons
    return peftkit.attach(model, peftkit.PrefixConfig(num_virtual_tokens=N, **config))


# -- the encoder --------------------------------------------------------------------------
def test_keys_and_values_follow_the_key_value_heads():
    pm = prefixed("llama")  # 4 query heads share 2 key/value heads of width 16
    encoder = pm.input_adapters["prefix"]
    assert (encoder.num_layers, encoder.num_kv_heads, encoder.head_dim) == (2, 2, 16)
    assert encoder.prefix["default"].shape == (N, 2 * 2 * 2 * 16)
    key_values = encoder("default", 3, torch.float32)
    assert len(key_values) == 2
    assert all(k.shape == v.shape == (3, 2, N, 16) for k, v in key_values)


def test_layout_is_peft_get_prompt():
    """Layer l's key is entry 2l of each row viewed as (layers * 2, heads, head_dim), its value
    entry 2l + 1, exactly as PEFT splits its prompt_embeddings."""
    peft = pytest.importorskip("peft")
    hf = peft.get_peft_model(tiny_llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    encoder = PrefixEncoder(num_layers=2, num_kv_heads=2, head_dim=16)
    encoder.add_adapter("default", N)
    with torch.no_grad():
        hf.prompt_encoder["default"].embedding.weight.copy_(encoder.prefix["default"])
        cache = hf.get_prompt(batch_size=3)
    for layer, (key, value) in enumerate(encoder("default", 3, torch.float32)):
        torch.testing.assert_close(key, cache.layers[layer].keys, rtol=0, atol=0)
        torch.testing.assert_close(value, cache.layers[layer].values, rtol=0, atol=0)


def test_projection_trains_an_mlp_and_folds_into_the_same_prefix():
    encoder = PrefixEncoder(num_layers=2, num_kv_heads=2, head_dim=4)
    encoder.add_adapter("a", 3, projection_dim=5)
    assert [n for n, _ in encoder.adapter_parameters("a")] == [
        "embedding.a", "mlp.a.0.weight", "mlp.a.0.bias", "mlp.a.2.weight", "mlp.a.2.bias"]
    assert encoder.embedding["a"].shape == (3, 8) and encoder.flat("a").shape == (3, 2 * 2 * 8)
    before = [t.detach().clone() for kv in encoder("a", 2, torch.float32) for t in kv]
    saved = encoder.adapter_state_dict("a")["prompt_embeddings"]
    assert "a" in encoder.mlp  # saving computes the folded tensor without touching the adapter
    encoder.embedding["a"].requires_grad_(False)
    encoder.fold("a")
    assert [n for n, _ in encoder.adapter_parameters("a")] == ["prefix.a"]
    assert not encoder.prefix["a"].requires_grad  # folding keeps the trainable flag
    torch.testing.assert_close(encoder.prefix["a"], saved, rtol=0, atol=0)
    after = [t for kv in encoder("a", 2, torch.float32) for t in kv]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_loading_a_saved_prefix_into_a_projected_adapter_folds_it():
    encoder = PrefixEncoder(num_layers=1, num_kv_heads=1, head_dim=4)
    encoder.add_adapter("a", 2, projection_dim=3)
    tensor = torch.randn(2, 8)
    encoder.load_adapter_state_dict("a", {"prompt_embeddings": tensor})
    assert "a" not in encoder.mlp and torch.equal(encoder.prefix["a"].detach(), tensor)


def test_one_prefix_active_at_a_time_in_the_encoder():
    encoder = PrefixEncoder(num_layers=1, num_kv_heads=1, head_dim=4)
    encoder.add_adapter("a", 2)
    encoder.add_adapter("b", 2, projection_dim=3)
    with pytest.raises(ValueError, match="one prefix-tuning adapter"):
        encoder.set_active_adapters(["a", "b"])
    encoder.delete_adapter("b")
    assert encoder.adapter_names == ["a"] and not encoder.mlp and not encoder.embedding


# -- init ------------------------------------------------------------------------------------
class FixedTokenizer:
    """Encodes any text to the same ids (the init only calls encode)."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def encode(self, text: str) -> list[int]:
        return list(self.ids)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_prefix_from_text_starts_as_that_text_read_first(arch):
    """init="text": the prefix is the keys and values the model computes for the text, so
    the model starts as if the text came before every input (Li & Liang's init from real
    words), checked against running the text and the input as one sequence."""
    text_ids = [5, 17, 42, 9]
    pm = prefixed(arch, init="text", init_text="any", tokenizer=FixedTokenizer(text_ids))
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    whole = torch.cat([torch.tensor(text_ids).expand(2, -1), ids], dim=1)
    with torch.no_grad():
        expected = pm.base_model(input_ids=whole).logits[:, N:]
        torch.testing.assert_close(pm(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "bert", "reference"])
def test_the_default_prefix_is_the_models_own_keys_of_vocabulary_tokens(arch):
    """init="vocab" (the default outside sequence classifiers): the keys and values the model
    computes for N drawn vocabulary tokens, at the scale of its own (PEFT's N(0, 1) is not);
    an encoder (BERT) and the native-prefix reference model alike. With projection_dim the
    default is N(0, 1)."""
    model = BUILDERS[arch](0)
    torch.manual_seed(0)
    pm = peftkit.attach(model, peftkit.PrefixConfig(num_virtual_tokens=N))
    assert pm.configs["default"].init == "vocab"
    torch.manual_seed(0)
    drawn = torch.randint(0, model.get_input_embeddings().num_embeddings, (N,))  # the ids the init drew
    expected = peftkit.integrations.token_key_values(model, drawn[None])
    encoder = pm.input_adapters["prefix"]
    for (key, value), (want_key, want_value) in zip(encoder("default", 1, torch.float32), expected):
        torch.testing.assert_close(key, want_key, rtol=0, atol=0)
        torch.testing.assert_close(value, want_value, rtol=0, atol=0)
    assert peftkit.PrefixConfig(projection_dim=8).init == "random"


def test_a_classifiers_default_prefix_is_n01():
    """On a sequence classifier, whose head is new anyway, the default prefix is N(0, 1) (as
    PEFT's); the config records what was chosen. An explicit init is kept."""
    pm = peftkit.attach(tiny_bert_classifier(), peftkit.PrefixConfig(num_virtual_tokens=N))
    assert pm.configs["default"].init == "random"
    prefix = pm.input_adapters["prefix"].prefix["default"].detach()
    assert abs(prefix.mean().item()) < 0.1 and 0.9 < prefix.std().item() < 1.1  # N x 2 x 2 x 32 values
    pm = peftkit.attach(tiny_bert_classifier(), peftkit.PrefixConfig(num_virtual_tokens=N, init="vocab"))
    assert pm.configs["default"].init == "vocab"
    assert peftkit.PrefixConfig().init is None  # decided at attach time


def test_bad_prefix_inits_are_refused():
    with pytest.raises(ValueError, match="init must be one of"):
        peftkit.PrefixConfig(init="zeros")
    with pytest.raises(ValueError, match="needs init_text and a tokenizer"):
        peftkit.PrefixConfig(init="text", init_text="hello")
    with pytest.raises(ValueError, match="drop projection_dim or use init='random'"):
        peftkit.PrefixConfig(init="vocab", projection_dim=8)


# -- forward -------------------------------------------------------------------------------
@pytest.mark.parametrize("projection_dim", [None, 8])
@pytest.mark.parametrize("arch", ARCHS)
def test_only_the_prefix_trains(arch, projection_dim):
    pm = prefixed(arch, projection_dim=projection_dim)
    declared = {id(p) for _, p in pm.input_adapters["prefix"].adapter_parameters()}
    assert {id(p) for p in pm.trainable_parameters().values()} == declared
    assert all(n.startswith("input_adapters.prefix.") for n in pm.trainable_parameters())
    ids, mask = pad(rows(), "left")
    hidden(pm(input_ids=ids, attention_mask=mask)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pm.trainable_parameters().values())
    assert all(p.grad is None for p in pm.parameters() if not p.requires_grad)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_changes_the_output_and_disable_gives_the_base(arch):
    pm = prefixed(arch)
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = hidden(pm(input_ids=ids))
        with pm.disable_adapter():
            disabled = hidden(pm(input_ids=ids))
        base = hidden(pm.base_model(input_ids=ids))
    assert out.shape == base.shape  # the prefix adds keys and values, not outputs
    assert not torch.allclose(out, base, atol=1e-4)
    torch.testing.assert_close(disabled, base, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_exactness(arch):
    """Every row gives the same outputs on its real tokens alone as in a left- and a
    right-padded batch: the prefix is always attendable, padding stays masked, positions
    come from the mask."""
    assert_padded_batch_exact(prefixed(arch), offset=0)


def test_padded_batch_exactness_with_projection():
    assert_padded_batch_exact(prefixed("llama", projection_dim=8), offset=0)


def test_repeated_calls_share_no_cache():
    pm = prefixed("llama")
    ids, mask = pad(rows(), "left")
    prefix = pm.input_adapters["prefix"].prefix["default"].detach().clone()
    with torch.no_grad():
        first = pm(input_ids=ids, attention_mask=mask).logits
        second = pm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert torch.equal(pm.input_adapters["prefix"].prefix["default"], prefix)


@pytest.mark.parametrize("arch", DECODERS)
def test_a_returned_cache_continues_the_sequence(arch):
    """Incremental decoding by hand: the returned cache holds the prefix, the next call's
    mask covers the caller's tokens only."""
    pm = prefixed(arch)
    ids, mask = pad(rows(), "left")
    with torch.no_grad():
        full = pm(input_ids=ids, attention_mask=mask).logits
        head = pm(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        cache = head.cache if hasattr(head, "cache") else head.past_key_values
        tail = pm(input_ids=ids[:, 5:], attention_mask=mask, past_key_values=cache).logits
    real = mask[:, 5:].bool()
    torch.testing.assert_close(tail[real], full[:, 5:][real], rtol=0, atol=1e-5)


def test_caller_positions_move_behind_the_prefix():
    pm = prefixed("llama")
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids, position_ids=torch.arange(5)[None]).logits,
                                   pm(input_ids=ids).logits, rtol=0, atol=0)


def test_bert_classification_with_a_prefix():
    pm = peftkit.attach(tiny_bert_classifier(), peftkit.PrefixConfig(num_virtual_tokens=N))
    rows_ = rows(seed=5, lengths=(7, 4, 6, 5))
    ids, mask = pad(rows_, "right")
    labels = torch.tensor([0, 1, 1, 0])
    optimizer = torch.optim.AdamW(pm.trainable_parameters().values(), lr=1e-1)
    first = pm(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    for _ in range(10):
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < first
    with torch.no_grad():
        batch = pm(input_ids=ids, attention_mask=mask).logits
        for i, row in enumerate(rows_):
            torch.testing.assert_close(pm(input_ids=row[None]).logits[0], batch[i], rtol=0, atol=1e-5)


def test_prefix_tuning_learns_with_projection():
    pm = peftkit.attach(tiny_reference(), peftkit.PrefixConfig(num_virtual_tokens=8, projection_dim=32))
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(pm.trainable_parameters().values(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


# -- generation ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", DECODERS)
def test_generate_with_cache_equals_recomputing_the_sequence(arch):
    pm = prefixed(arch, seed=1)
    ids, mask = pad(rows(seed=3), "left")
    generated = pm.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert generated.shape == (3, ids.shape[1] + 6)
    torch.testing.assert_close(generated, greedy_by_recomputing(pm, ids, mask, 6), rtol=0, atol=0)


def test_generate_rows_alone_equal_rows_in_a_left_padded_batch():
    pm = prefixed("llama", seed=2)
    rows_ = rows(seed=4)
    ids, mask = pad(rows_, "left")
    batch = pm.generate(ids, attention_mask=mask, max_new_tokens=5)[:, -5:]
    for i, row in enumerate(rows_):
        torch.testing.assert_close(batch[i], pm.generate(row[None], max_new_tokens=5)[0, -5:], rtol=0, atol=0)


def test_generate_without_a_prefix_is_the_models_own():
    pm = peftkit.attach(tiny_llama(), peftkit.LoraConfig(r=4))
    peftkit.attach(pm, peftkit.PrefixConfig(num_virtual_tokens=N), name="prefix")
    pm.set_adapter("default")
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    expected = pm.base_model.generate(ids, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(pm.generate(ids, max_new_tokens=4, do_sample=False), expected, rtol=0, atol=0)


# -- what it refuses -----------------------------------------------------------------------
def test_models_without_a_cache_or_prefix_hook_are_refused():
    class NoCache(nn.Module):
        config = SimpleNamespace(num_hidden_layers=1, num_attention_heads=2, hidden_size=8)

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, input_ids=None, attention_mask=None):
            return self.proj(input_ids)

    with pytest.raises(ValueError, match="takes no cache"):
        peftkit.attach(NoCache(), peftkit.PrefixConfig(num_virtual_tokens=2))


def test_encoder_decoders_are_refused():
    model = tiny_llama()
    model.config.is_encoder_decoder = True
    with pytest.raises(ValueError, match="encoder-decoder"):
        peftkit.attach(model, peftkit.PrefixConfig(num_virtual_tokens=2))


def test_merge_and_unload_refuses_a_prefix():
    pm = prefixed("llama")
    with pytest.raises(TypeError, match="cannot carry it"):
        pm.merge_and_unload()


# -- files -----------------------------------------------------------------------------------
def unpadded_ids() -> torch.Tensor:
    """PEFT places left-padded rows by column, not by mask, so exact comparisons with it use
    unpadded batches (where both number positions the same way)."""
    return torch.randint(1, 128, (3, 9), generator=torch.Generator().manual_seed(0))


def test_save_writes_the_folded_prefix_and_loads_back(tmp_path):
    pm = prefixed("reference", projection_dim=8)
    ids, mask = pad(rows(), "left")
    with torch.no_grad():
        expected = pm(input_ids=ids, attention_mask=mask).logits
    pm.save(tmp_path / "prefix")
    config = json.loads((tmp_path / "prefix" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["prefix_projection"] is False
    assert "default" in pm.input_adapters["prefix"].mlp  # still trainable through the MLP
    loaded = peftkit.load(tiny_reference(), tmp_path / "prefix")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-6)


def test_config_records_the_key_value_geometry_as_peft_does(tmp_path):
    prefixed("llama").save(tmp_path / "prefix")
    config = json.loads((tmp_path / "prefix" / "adapter_config.json").read_text())
    assert (config["token_dim"], config["num_attention_heads"], config["num_layers"]) == (32, 2, 2)
    assert config["num_virtual_tokens"] == N and config["task_type"] == "CAUSAL_LM"


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_peft_prefix_loads_in_peftkit(arch, projection, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(7)
    settings = {"prefix_projection": True, "encoder_hidden_size": 16} if projection else {}
    hf = peft.get_peft_model(BUILDERS[arch](0), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, **settings)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ids = unpadded_ids()
    with torch.no_grad():
        # PEFT, too, runs a saved prefix as the folded tensor.
        expected = peft.PeftModel.from_pretrained(BUILDERS[arch](0), tmp_path / "hf")(
            input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        pm = peftkit.load(BUILDERS[arch](0), tmp_path / "hf")
        torch.testing.assert_close(pm(input_ids=ids).logits, expected, rtol=0, atol=0)
        live = hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.testing.assert_close(pm(input_ids=ids).logits, live, rtol=0, atol=1e-5)


@pytest.mark.parametrize("projection_dim", [None, 8])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peftkit_prefix_loads_in_hf_peft(arch, projection_dim, tmp_path):
    peft = pytest.importorskip("peft")
    pm = prefixed(arch, projection_dim=projection_dim)
    pm.save(tmp_path / "ours")
    ids = unpadded_ids()
    with torch.no_grad():
        expected = pm(input_ids=ids).logits
        hf = peft.PeftModel.from_pretrained(BUILDERS[arch](0), tmp_path / "ours").eval()
        got = hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0 if projection_dim is None else 1e-6)
