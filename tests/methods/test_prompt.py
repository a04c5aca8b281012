"""Prompt tuning: the soft prompt at the input embeddings (M7), padded batches, generation,
initialisation, training, LoRA beside it, and files that move both ways with Hugging Face PEFT.

Every model is a tiny seeded random-weight model (tests/helpers.py); nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import BUILDERS, tiny_bert_classifier, tiny_llama, tiny_reference
from virtual_tokens import (
    assert_padded_batch_exact, greedy_by_recomputing, hidden, pad, rows,
)

import peftkit
from peftkit.learning_rates import default_parameter_groups
from peftkit.methods.prompt import PromptEncoder, initial_prompt, text_token_ids

pytest.importorskip("transformers")

N = 4
PAD_ID = 0
DECODERS = ["llama", "gpt2", "reference"]


pytestmark = pytest.mark.usefixtures("one_thread")


def prompted(arch: str, seed: int = 0, **config) -> peftkit.PeftModel:
    model = BUILDERS[arch](seed)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = None  # generate the full length in comparisons
    return peftkit.attach(model, peftkit.PromptConfig(num_virtual_tokens=N, **config))


# -- the encoder ---------------------------------------------------------------------
def test_encoder_follows_the_adapter_protocol():
    encoder = PromptEncoder(token_dim=8)
    encoder.add_adapter("a", torch.randn(3, 8, dtype=torch.float64))
    encoder.add_adapter("b", torch.randn(5, 8))
    assert encoder.adapter_names == ["a", "b"] and encoder.num_virtual_tokens("b") == 5
    assert encoder.embeddings["a"].dtype == torch.float32  # kept in float32, as PEFT does
    assert encoder("a", 2, torch.float16).shape == (2, 3, 8)
    assert encoder("a", 2, torch.float16).dtype == torch.float16
    assert [n for n, _ in encoder.adapter_parameters("b")] == ["embeddings.b"]
    assert set(encoder.adapter_state_dict("a")) == {"prompt_embeddings"}
    with pytest.raises(ValueError, match="one prompt-tuning adapter"):
        encoder.set_active_adapters(["a", "b"])
    with pytest.raises(ValueError, match=r"\(num_virtual_tokens, 8\)"):
        encoder.add_adapter("c", torch.randn(3, 7))
    encoder.delete_adapter("a")
    assert encoder.adapter_names == ["b"]


# -- initialisation -------------------------------------------------------------------
def test_text_ids_are_repeated_or_cut_to_length():
    assert text_token_ids([5, 6, 7], 7).tolist() == [5, 6, 7, 5, 6, 7, 5]
    assert text_token_ids([5, 6, 7], 2).tolist() == [5, 6]
    with pytest.raises(ValueError, match="no tokens"):
        text_token_ids([], 3)


def test_vocab_init_takes_rows_of_the_embedding_table():
    model = tiny_llama()
    table = model.get_input_embeddings().weight
    prompt = initial_prompt(peftkit.PromptConfig(num_virtual_tokens=6, init="vocab"), model.get_input_embeddings())
    assert (prompt[:, None, :] == table[None]).all(-1).any(-1).all()  # every row is a vocabulary row


def test_text_init_takes_the_embeddings_of_the_text():
    from peftkit.models import ByteTokenizer

    model = tiny_reference()
    config = peftkit.PromptConfig(num_virtual_tokens=5, init="text", init_text="hi!", tokenizer=ByteTokenizer())
    pm = peftkit.attach(model, config)
    expected = model.embed_tokens.weight[torch.tensor([104, 105, 33, 104, 105])]
    torch.testing.assert_close(pm.input_adapters["prompt"].embeddings["default"], expected, rtol=0, atol=0)


def test_text_init_refuses_ids_outside_the_vocabulary():
    from peftkit.models import ByteTokenizer

    config = peftkit.PromptConfig(num_virtual_tokens=3, init="text", init_text="é", tokenizer=ByteTokenizer())
    with pytest.raises(ValueError, match="model's own tokenizer"):
        peftkit.attach(tiny_llama(), config)  # bytes 195, 169 are beyond Llama's 128 ids


def test_random_init_is_at_the_scale_of_the_vocabulary():
    model = tiny_llama()
    embed = model.get_input_embeddings()
    torch.manual_seed(0)
    prompt = initial_prompt(peftkit.PromptConfig(num_virtual_tokens=64), embed)
    assert prompt.std().item() == pytest.approx(embed.weight.std().item(), rel=0.25)


# -- forward ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "reference"])
def test_only_the_prompt_trains(arch):
    pm = prompted(arch)
    prompt = pm.input_adapters["prompt"].embeddings["default"]
    assert list(pm.trainable_parameters()) == ["input_adapters.prompt.embeddings.default"]
    assert pm.parameter_counts()[0] == N * prompt.shape[1]
    ids, mask = pad(rows(), "left")
    hidden(pm(input_ids=ids, attention_mask=mask)).square().mean().backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in pm.parameters() if p is not prompt)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "reference"])
def test_prompt_leads_the_outputs_and_changes_the_real_tokens(arch):
    pm = prompted(arch)
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = hidden(pm(input_ids=ids))
        with pm.disable_adapter():
            base = hidden(pm(input_ids=ids))
    assert out.shape[1] == N + 6 and base.shape[1] == 6  # PEFT's layout: the prompt's outputs first
    assert not torch.allclose(out[:, N:], base, atol=1e-4)
    torch.testing.assert_close(hidden(pm.base_model(input_ids=ids)), base, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "reference"])
def test_padded_batch_exactness(arch):
    """Every row gives the same outputs on its real tokens alone as in a left- and a
    right-padded batch (positions come from the mask, the prompt is always attendable)."""
    assert_padded_batch_exact(prompted(arch), offset=N)


def test_inputs_embeds_and_input_ids_agree():
    pm = prompted("llama")
    ids, mask = pad(rows(), "left")
    with torch.no_grad():
        from_ids = pm(input_ids=ids, attention_mask=mask).logits
        from_embeds = pm(inputs_embeds=pm.get_input_embeddings()(ids), attention_mask=mask).logits
    torch.testing.assert_close(from_embeds, from_ids, rtol=0, atol=0)


def test_token_labels_are_extended_with_ignored_prompt_positions():
    pm = prompted("llama")
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    out = pm(input_ids=ids, labels=ids)
    # The causal-LM loss on N + T positions, the prompt's labels -100: the first real token is
    # scored from the last prompt position, no prompt position is scored.
    labels = torch.cat([torch.full((2, N), -100), ids], dim=1)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_caller_positions_move_behind_the_prompt():
    pm = prompted("llama")
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        default = pm(input_ids=ids).logits
        given = pm(input_ids=ids, position_ids=torch.arange(5)[None]).logits
    torch.testing.assert_close(given, default, rtol=0, atol=0)


# -- generation --------------------------------------------------------------------------
@pytest.mark.parametrize("arch", DECODERS)
def test_generate_with_cache_equals_recomputing_the_sequence(arch):
    pm = prompted(arch, seed=1)
    ids, mask = pad(rows(seed=3), "left")
    generated = pm.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert generated.shape == (3, ids.shape[1] + 6)
    torch.testing.assert_close(generated[:, :ids.shape[1]], ids, rtol=0, atol=0)
    torch.testing.assert_close(generated, greedy_by_recomputing(pm, ids, mask, 6), rtol=0, atol=0)


def test_generate_rows_alone_equal_rows_in_a_left_padded_batch():
    pm = prompted("llama", seed=2)
    rows_ = rows(seed=4)
    ids, mask = pad(rows_, "left")
    batch = pm.generate(ids, attention_mask=mask, max_new_tokens=5)[:, -5:]
    for i, row in enumerate(rows_):
        torch.testing.assert_close(batch[i], pm.generate(row[None], max_new_tokens=5)[0, -5:], rtol=0, atol=0)


def test_generate_stops_at_eos_and_pads_finished_rows():
    pm = prompted("llama", seed=1)
    ids, mask = pad(rows(seed=3), "left")
    free = pm.generate(ids, attention_mask=mask, max_new_tokens=6)[:, ids.shape[1]:]
    eos = int(free[0, 1])  # make row 0's second new token the end of sequence
    out = pm.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=PAD_ID)
    new = out[:, ids.shape[1]:]
    assert new[0, 1] == eos and (new[0, 2:] == PAD_ID).all()
    for i in range(3):
        stop = (free[i] == eos).nonzero()
        end = int(stop[0]) + 1 if len(stop) else new.shape[1]
        torch.testing.assert_close(new[i, :end], free[i, :end], rtol=0, atol=0)


def test_generate_refuses_right_padding_and_unknown_settings():
    pm = prompted("llama")
    ids, mask = pad(rows(), "right")
    with pytest.raises(ValueError, match="left-padded"):
        pm.generate(ids, attention_mask=mask)
    with pytest.raises(TypeError, match="num_beams"):
        pm.generate(ids[:1], num_beams=2)


def test_sampling_respects_top_k():
    pm = prompted("llama")
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        best = pm(input_ids=ids).logits[0, -1].argmax()
    torch.manual_seed(0)
    out = pm.generate(ids, max_new_tokens=1, do_sample=True, top_k=1, temperature=0.7)
    assert out[0, -1] == best


# -- training -----------------------------------------------------------------------------
def test_prompt_tuning_learns_on_the_reference_decoder():
    pm = peftkit.attach(tiny_reference(), peftkit.PromptConfig(num_virtual_tokens=8, init="vocab"))
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(pm.trainable_parameters().values(), lr=3e-2)
    losses = []
    for _ in range(30):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05  # a random decoder: the prompt can only steer it so far


def test_bert_classification_with_a_prompt():
    """Class labels (B,) are not token labels: they are passed through, never extended."""
    pm = peftkit.attach(tiny_bert_classifier(), peftkit.PromptConfig(num_virtual_tokens=N, init="vocab"))
    rows_ = rows(seed=5, lengths=(7, 4, 6, 5))
    ids, mask = pad(rows_, "right")
    labels = torch.tensor([0, 1, 1, 0])
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (4, 2)
    # The prompt and (by default) trained copies of the head and its pooler.
    assert {n.split(".copies")[0] for n in pm.trainable_parameters() if ".copies." in n} == {"bert.pooler", "classifier"}
    assert {n.split(".")[0] for n in pm.trainable_parameters()} == {"input_adapters", "bert", "classifier"}
    optimizer = torch.optim.AdamW(default_parameter_groups(pm))  # the prompt at 3e-2, the head at 1e-3
    first = out.loss.item()
    for _ in range(15):
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < first
    # A sentence classified alone or inside a padded batch gets the same logits.
    with torch.no_grad():
        batch = pm(input_ids=ids, attention_mask=mask).logits
        for i, row in enumerate(rows_):
            torch.testing.assert_close(pm(input_ids=row[None]).logits[0], batch[i], rtol=0, atol=1e-5)


def test_lora_and_prompt_train_together():
    pm = peftkit.attach(tiny_llama(), peftkit.LoraConfig(r=4), name="lora")
    peftkit.attach(pm, peftkit.PromptConfig(num_virtual_tokens=N), name="prompt")
    pm.set_adapter(["lora", "prompt"])
    trainable = pm.trainable_parameters()
    assert "input_adapters.prompt.embeddings.prompt" in trainable
    assert any(".lora_A.lora" in n for n in trainable) and any(".lora_B.lora" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    pm(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in trainable.values())
    assert all(p.grad is None for p in pm.parameters() if not p.requires_grad)
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in trainable.items())
    # Both adapters act: the output differs from each one alone.
    with torch.no_grad():
        both = pm(input_ids=ids).logits
        pm.set_adapter("prompt")
        prompt_only = pm(input_ids=ids).logits
    assert not torch.allclose(both, prompt_only, atol=1e-5)


def test_one_prompt_or_prefix_active_at_a_time():
    pm = prompted("llama")
    peftkit.attach(pm, peftkit.PromptConfig(num_virtual_tokens=2), name="other")
    peftkit.attach(pm, peftkit.PrefixConfig(num_virtual_tokens=2), name="prefix")
    for names in (["default", "other"], ["default", "prefix"]):
        with pytest.raises(ValueError, match="at most one prompt or prefix"):
            pm.set_adapter(names)


def test_delete_unload_and_merge_and_unload():
    ids = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    pm = prompted("llama")
    with pytest.raises(TypeError, match="cannot carry it"):
        pm.merge_and_unload()
    pm.delete_adapter("default")
    assert len(pm.input_adapters) == 0
    plain = prompted("llama").unload()
    torch.testing.assert_close(plain(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits, rtol=0, atol=0)


# -- files ------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    pm = prompted("reference", init="vocab")
    ids, mask = pad(rows(), "left")
    with torch.no_grad():
        expected = pm(input_ids=ids, attention_mask=mask).logits
    pm.save(tmp_path / "prompt")
    config = json.loads((tmp_path / "prompt" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert config["prompt_tuning_init"] == "SAMPLE_VOCAB"
    loaded = peftkit.load(tiny_reference(), tmp_path / "prompt")
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)


def test_a_prompt_for_another_width_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    prompted("reference").save(tmp_path / "prompt")
    wider = GPT2LMHeadModel(GPT2Config(n_embd=96, n_layer=2, n_head=4, vocab_size=128, n_positions=128))
    with pytest.raises(peftkit.AdapterFileError, match=r"prompt_embeddings: expected shape \(4, 96\)"):
        peftkit.load(wider, tmp_path / "prompt")
    assert all(p.requires_grad for p in wider.parameters())  # the refused load left it as it was


PEFT_TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION"}


def unpadded_ids() -> torch.Tensor:
    """PEFT places left-padded rows by column, not by mask, so exact comparisons with it use
    unpadded batches (where both number positions the same way)."""
    return torch.randint(1, 128, (3, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", list(PEFT_TASKS))
def test_hf_peft_prompt_loads_in_peftkit(arch, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(7)
    hf = peft.get_peft_model(BUILDERS[arch](0), peft.PromptTuningConfig(
        task_type=PEFT_TASKS[arch], num_virtual_tokens=N, prompt_tuning_init="SAMPLE_VOCAB")).eval()
    hf.save_pretrained(tmp_path / "hf")
    ids = unpadded_ids()
    with torch.no_grad():
        expected = hidden(hf(input_ids=ids, attention_mask=torch.ones_like(ids)))
        pm = peftkit.load(BUILDERS[arch](0), tmp_path / "hf")
        torch.testing.assert_close(hidden(pm(input_ids=ids)), expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", list(PEFT_TASKS))
def test_peftkit_prompt_loads_in_hf_peft(arch, tmp_path):
    peft = pytest.importorskip("peft")
    pm = prompted(arch, init="vocab")
    pm.save(tmp_path / "ours")
    ids = unpadded_ids()
    with torch.no_grad():
        expected = hidden(pm(input_ids=ids))
        hf = peft.PeftModel.from_pretrained(BUILDERS[arch](0), tmp_path / "ours").eval()
        torch.testing.assert_close(hidden(hf(input_ids=ids, attention_mask=torch.ones_like(ids))), expected,
                                   rtol=0, atol=0)
