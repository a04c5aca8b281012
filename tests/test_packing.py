"""Sample packing (``peftkit.packing``): a packed batch trains exactly as the padded batch of
the same examples (the same loss, the same LoRA gradients), no example sees another, the
layout is as documented, the batches of a run are a function of the seed, and what packing
would get wrong is refused."""

from __future__ import annotations

import random

import pytest
import torch

import peftkit
from peftkit.data import Dataset, Example, collate
from peftkit.methods.base import adapter_modules
from peftkit.packing import PackedBatches, check_packable, collate_packed, first_fit, packed_attention
from peftkit.train import _count_tokens, _micro_batch, accumulate_gradients, train
from helpers import randomize_adapters, tiny_gpt2, tiny_llama, tiny_reference

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_LENGTH = 24
# Uneven on purpose: rows hold 2 to 4 examples and end with different amounts of padding.
LENGTHS = [9, 3, 14, 5, 7, 11, 2, 6, 4, 10]


def _examples(lengths=LENGTHS, seed=0) -> list[Example]:
    """Causal examples; every third one has a prompt (labels -100) as completion data does."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, 128, (n,), generator=gen).tolist()
        labels = list(ids)
        if i % 3 == 0:
            labels[:n // 2] = [-100] * (n // 2)
        examples.append(Example(ids, labels))
    return examples


def _dataset(examples=None, fmt="text") -> Dataset:
    return Dataset(fmt, _examples() if examples is None else examples)


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        max_position_embeddings=128)).eval()


def _tiny_opt():
    """OPT's attention takes no position ids (it builds its mask without them): packed by a 4D mask."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                    word_embed_proj_dim=64, vocab_size=128, max_position_embeddings=128)).eval()


def _tiny_bloom():
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=128)).eval()


# family -> (builder, the layout packed_attention must find)
FAMILIES = {"reference": (tiny_reference, "positions"), "llama": (tiny_llama, "positions"),
            "qwen2": (_tiny_qwen2, "positions"), "gpt2": (tiny_gpt2, "positions"), "opt": (_tiny_opt, "mask")}


def _lora(builder):
    pm = peftkit.attach(builder(), peftkit.LoraConfig(r=4, alpha=8))
    randomize_adapters(pm)  # B away from zero, so that A gets a gradient too
    return pm.eval()  # no dropout: both batches see the same function


def _lora_grads(pm) -> dict[str, torch.Tensor]:
    grads = {f"{path}.{local}": param.grad.clone() for path, module in adapter_modules(pm.base_model)
             for local, role, param in module.parameter_roles("default") if role in ("lora_A", "lora_B")}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    return grads


def _packed_all(examples, attention="positions"):
    """Every example in one packed batch (all rows)."""
    batches = PackedBatches(_dataset(examples), batch_size=len(examples), max_length=MAX_LENGTH, pad_id=0,
                            attention=attention)
    assert len(batches) == 1 and len(batches.rows) < len(examples)  # several examples share rows
    return batches.at(0)


# -- parity: the loss and the adapter gradients of the padded batch ------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_batch_gives_the_loss_and_lora_gradients_of_the_padded_batch(family):
    builder, layout = FAMILIES[family]
    examples = _examples()
    padded = _lora(builder)
    padded_loss = padded(**collate(examples, pad_id=0)).loss
    padded_loss.backward()
    packed = _lora(builder)
    assert packed_attention(packed) == layout
    packed_loss = packed(**_packed_all(examples, layout)).loss
    packed_loss.backward()

    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    padded_grads, packed_grads = _lora_grads(padded), _lora_grads(packed)
    assert padded_grads.keys() == packed_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_rows_split_into_micro_batches_give_the_step_of_one_padded_batch():
    examples = _examples()
    batches = PackedBatches(_dataset(examples), batch_size=2, max_length=MAX_LENGTH, pad_id=0)
    micro = [batches.at(k) for k in range(len(batches))]
    assert len(micro) > 1
    padded, packed = _lora(tiny_reference), _lora(tiny_reference)
    padded_loss = accumulate_gradients(padded, [collate(examples, pad_id=0)])
    packed_loss = accumulate_gradients(packed, micro)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    for name, grad in _lora_grads(padded).items():
        torch.testing.assert_close(_lora_grads(packed)[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_training_loop_runs_packed_batches_and_counts_only_real_tokens():
    examples = _examples()
    batches = PackedBatches(_dataset(examples), batch_size=2, max_length=MAX_LENGTH, pad_id=0)
    pm = peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=4))
    result = train(pm, batches, steps=2 * len(batches), lr=1e-3, progress=False)  # two epochs
    assert len(result.losses) == 2 * len(batches)
    assert result.tokens == 2 * sum(len(e.input_ids) for e in examples)  # the padding is not counted
    assert _micro_batch(batches, 3)["input_ids"].equal(batches.at(3)["input_ids"])


# -- no attention across examples ----------------------------------------------------------


@pytest.mark.parametrize("family", ["reference", "llama", "opt"])
def test_changing_one_example_leaves_the_next_examples_logits_alone(family):
    builder, layout = FAMILIES[family]
    model = builder()
    first, second = _examples([6, 8], seed=1)
    other_first = Example([(t + 17) % 128 for t in first.input_ids], first.labels)

    def second_logits(row_first, attention=layout):
        batch = dict(collate_packed([[row_first, second]], pad_id=0, attention=attention))
        del batch["labels"]
        with torch.no_grad():
            return model(**batch).logits[0, 6:14]

    torch.testing.assert_close(second_logits(other_first), second_logits(first), rtol=0, atol=1e-5)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([second.input_ids])).logits[0]
    torch.testing.assert_close(second_logits(first), alone, rtol=1e-5, atol=1e-5)
    # The same row attended causally as a whole does see the first example: the check can fail.
    ids = torch.tensor([first.input_ids + second.input_ids])
    with torch.no_grad():
        leaked = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 6:14]
    assert (leaked - alone).abs().max() > 1e-3


def test_a_transformers_cache_would_turn_packing_off_so_packed_batches_carry_use_cache_false():
    """transformers finds packed rows from position_ids only with no mask and no cache, and
    Llama makes a cache whenever use_cache is on (its config's default)."""
    model = tiny_llama()
    assert model.config.use_cache
    batch = _packed_all(_examples())
    assert batch["use_cache"] is False and "attention_mask" not in batch
    with torch.no_grad():
        right = model(**batch).loss
        leaked = model(**{**batch, "use_cache": True}).loss
    assert abs(float(right - leaked)) > 1e-4


# -- the layout ----------------------------------------------------------------------------


def test_positions_restart_for_each_example_and_for_the_padding():
    a, b, c = _examples([3, 4, 2])
    batch = collate_packed([[a, b], [c]], pad_id=0)
    # Padding sits at position 0 (each pad token its own segment), never past the longest example.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 0, 0, 0, 0]]
    assert batch["input_ids"].tolist() == [a.input_ids + b.input_ids, c.input_ids + [0] * 5]
    assert batch.real_tokens == 9 and _count_tokens(batch) == 9


def test_the_first_token_of_every_example_and_the_padding_are_no_target():
    a, b = Example([5, 6, 7], [5, 6, 7]), Example([8, 9], [8, 9])
    c = Example([10, 11, 12], [-100, -100, 12])  # a completion: its prompt stays out of the loss
    batch = collate_packed([[a, b, c], [b]], pad_id=0)
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, 12],
                                        [-100, 9, -100, -100, -100, -100, -100, -100]]


def test_the_mask_layout_is_causal_within_examples_and_blocks_the_padding_apart():
    a, b = _examples([2, 3])
    mask = collate_packed([[a, b], [a]], pad_id=0, attention="mask")["attention_mask"]
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.float32
    allowed = (mask[:, 0] == 0).int().tolist()
    assert allowed[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    # Each padding token looks at itself alone, as with position ids (every pad at position 0).
    assert allowed[1] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]


# -- packing and drawing -------------------------------------------------------------------


def test_first_fit_puts_each_example_in_the_first_row_with_room():
    assert first_fit([5, 4, 3, 2, 6], 8) == [[0, 2], [1, 3], [4]]
    assert first_fit([8, 1, 8, 7], 8) == [[0], [1, 3], [2]]


def test_rows_never_exceed_max_length_and_hold_every_example_once():
    rng = random.Random(3)
    examples = _examples([rng.randint(1, MAX_LENGTH) for _ in range(300)], seed=3)
    batches = PackedBatches(_dataset(examples), batch_size=8, max_length=MAX_LENGTH, pad_id=0, seed=5)
    assert all(sum(len(e.input_ids) for e in row) <= MAX_LENGTH for row in batches.rows)
    assert sorted(id(e) for row in batches.rows for e in row) == sorted(id(e) for e in examples)
    total = sum(len(e.input_ids) for e in examples)
    assert len(batches.rows) < 1.25 * total / MAX_LENGTH  # first-fit leaves little room unused
    widths = [batches.at(k)["input_ids"].shape[1] for k in range(len(batches))]
    assert max(widths) <= MAX_LENGTH


def test_an_example_longer_than_max_length_is_refused():
    with pytest.raises(ValueError, match="more than max_length=8"):
        PackedBatches(_dataset(_examples([5, 9])), batch_size=2, max_length=8, pad_id=0)


def test_a_resumed_run_draws_the_same_batches_and_each_epoch_draws_every_row_once():
    def make():
        return PackedBatches(_dataset(), batch_size=2, max_length=MAX_LENGTH, pad_id=0, seed=4)

    run, resumed = make(), make()
    n = len(run)
    assert n == -(-len(run.rows) // 2)
    for k in (0, 1, n, 2 * n + 1, n - 1):
        for key in ("input_ids", "position_ids", "labels"):
            assert resumed.at(k)[key].equal(run.at(k)[key])
    assert [r for r in run.rows] == [r for r in resumed.rows]
    assert sorted(run.order(0)) == sorted(run.order(1)) == list(range(len(run.rows)))
    assert run.order(0) != run.order(1)
    other = PackedBatches(_dataset(), batch_size=2, max_length=MAX_LENGTH, pad_id=0, seed=5)
    assert [[id(e) for e in row] for row in other.rows] != [[id(e) for e in row] for row in run.rows]


# -- refusals ------------------------------------------------------------------------------


def test_classification_data_is_refused():
    data = Dataset("classification", [Example([3, 4, 5], 1)], ["negative", "positive"])
    with pytest.raises(ValueError, match="classification data.*without --pack"):
        check_packable(data, peftkit.LoraConfig(), tiny_reference())
    with pytest.raises(ValueError, match="classification"):
        PackedBatches(data, batch_size=1, max_length=8, pad_id=0)


@pytest.mark.parametrize("config", [peftkit.PrefixConfig(num_virtual_tokens=4),
                                    peftkit.PromptConfig(num_virtual_tokens=4)], ids=["prefix", "prompt"])
def test_prefix_and_prompt_tuning_are_refused(config):
    with pytest.raises(ValueError, match="--pack works with lora and adapter.*virtual tokens"):
        check_packable(_dataset(), config, tiny_reference())


def test_lora_and_adapters_on_a_model_with_a_packed_path_are_accepted():
    assert check_packable(_dataset(), peftkit.LoraConfig(), tiny_llama()) == "positions"
    assert check_packable(_dataset(), peftkit.AdapterConfig(bottleneck=8), _tiny_opt()) == "mask"


def test_a_model_whose_attention_cannot_be_packed_is_refused():
    """Bloom's ALiBi attention takes no position ids and builds its own mask from a 2D one."""
    model = _tiny_bloom().train()
    with pytest.raises(ValueError, match="BloomForCausalLM has none.*without --pack"):
        check_packable(_dataset(), peftkit.LoraConfig(), model)
    assert model.training  # the probe gives the mode back


# -- the reference decoder -----------------------------------------------------------------


def test_the_reference_decoder_is_unchanged_without_restarting_positions(ids):
    model = tiny_reference()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        counted = model(input_ids=ids, position_ids=torch.arange(12).expand(2, 12)).logits
        restart = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8]] * 2)
        masked = model(input_ids=ids, position_ids=restart, attention_mask=torch.ones_like(ids)).logits
        packed = model(input_ids=ids, position_ids=restart).logits
    assert counted.equal(plain)
    # With a mask the positions only place the tokens; attention stays causal over the row.
    assert masked[:, :3].equal(plain[:, :3]) and not torch.allclose(masked[:, 3:], packed[:, 3:])


def test_peftkit_train_pack_killed_and_resumed_ends_with_the_uninterrupted_adapter(tmp_path, monkeypatch):
    import json

    from safetensors.torch import load_file

    from helpers import reference_run_inputs, train_killed_after
    from peftkit.cli import main

    model, data = reference_run_inputs(tmp_path)
    common = ["train", "--model", str(model), "--data", str(data), "--pack", "--max-length", "128",
              "--batch-size", "2", "--max-steps", "8", "--lr", "2e-3", "--dropout", "0.1",
              "--checkpoint-every", "3", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "whole")]) == 0
    log = [json.loads(line) for line in (tmp_path / "whole" / "train_log.jsonl").read_text().splitlines()]
    per_step = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + log, log)]
    # Two packed rows of several ~37-token examples each: more than two examples, no padding counted.
    assert all(2 * 37 < n <= 2 * 128 for n in per_step), per_step

    # Killed after step 5, with its checkpoint at step 3, then resumed.
    train_killed_after(monkeypatch, 5, common + ["--out", str(tmp_path / "killed")])
    assert main(common + ["--out", str(tmp_path / "killed"), "--resume"]) == 0
    assert json.loads((tmp_path / "killed" / "run.json").read_text())["options"]["pack"] is True
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    again = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == again.keys() and whole
    for key in whole:
        torch.testing.assert_close(again[key], whole[key], rtol=0, atol=0)


def test_peftkit_train_pack_refuses_prompt_tuning_and_writes_nothing(tmp_path, capsys):
    from helpers import reference_run_inputs
    from peftkit.cli import main

    model, data = reference_run_inputs(tmp_path)
    out = tmp_path / "run"
    code = main(["train", "--model", str(model), "--data", str(data), "--pack", "--method", "prompt",
                 "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--pack works with" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("family", ["reference", "llama"])
def test_packed_batch_gives_the_bottleneck_adapter_gradients_of_the_padded_batch(family):
    builder, layout = FAMILIES[family]
    examples = _examples()

    def adapted():
        pm = peftkit.attach(builder(), peftkit.AdapterConfig(bottleneck=8))
        randomize_adapters(pm)  # up away from zero, so that down gets a gradient too
        return pm.eval()

    padded, packed = adapted(), adapted()
    padded_loss = padded(**collate(examples, pad_id=0)).loss
    padded_loss.backward()
    packed_loss = packed(**_packed_all(examples, layout)).loss
    packed_loss.backward()
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    grads = lambda pm: {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}  # noqa: E731
    expected, found = grads(padded), grads(packed)
    assert expected and expected.keys() == found.keys()
    for name, grad in expected.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(found[name], grad, rtol=1e-4, atol=1e-6, msg=name)
