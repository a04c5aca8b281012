"""Reference decoder and byte tokenizer: shapes, masking exactness, cache, files."""

import ast
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from peftkit.models import ByteTokenizer, ReferenceConfig, ReferenceDecoder, ReferenceOutput

TINY = dict(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
            intermediate_size=64, max_positions=64)
PAD = 0


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ReferenceDecoder(ReferenceConfig(**TINY)).eval()


def random_ids(*shape):
    return torch.randint(1, TINY["vocab_size"], shape)


def pad_batch(rows, side):
    """Pad 1-D id tensors to one (B, T) batch with PAD; returns ids and mask."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), PAD)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[i, span] = row
        mask[i, span] = 1
    return ids, mask


def naive_greedy(model, ids, mask, steps):
    """Greedy decoding that recomputes the whole sequence every step (no cache)."""
    for _ in range(steps):
        logits = model(ids, attention_mask=mask).logits
        next_ids = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
    return ids


# --- config ---------------------------------------------------------------------------

def test_config_round_trip_and_unknown_field():
    config = ReferenceConfig(**TINY)
    data = config.to_dict()
    assert data["model_type"] == "peftkit-reference"
    assert ReferenceConfig.from_dict(json.loads(json.dumps(data))) == config
    with pytest.raises(ValueError, match="hidden_sise"):
        ReferenceConfig.from_dict({**data, "hidden_sise": 8})
    with pytest.raises(ValueError, match="divisible"):
        ReferenceConfig(hidden_size=30, num_heads=4)


def test_structure_and_targets(model):
    block = model.layers[0]
    assert [name for name, _ in block.attn.named_children()] == ["q", "k", "v", "o"]
    assert all(getattr(block.attn, n).bias is not None for n in "qkvo")
    assert model.lm_head.bias is None
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.get_input_embeddings() is model.embed_tokens
    assert model.get_output_embeddings() is model.lm_head
    assert ReferenceDecoder.peft_default_targets == ("q", "v")
    assert ReferenceDecoder.peft_attention_targets == ("q", "k", "v", "o")
    untied = ReferenceDecoder(ReferenceConfig(**TINY, tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_imports_only_torch_safetensors_and_stdlib():
    package = Path(__import__("peftkit.models", fromlist=["_"]).__file__).parent
    allowed = {"torch", "safetensors"} | set(sys.stdlib_module_names)
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, f"{path.name} imports {roots}"


# --- forward --------------------------------------------------------------------------

def test_logits_shape_and_output_type(model):
    out = model(random_ids(3, 7))
    assert isinstance(out, ReferenceOutput)
    assert out.logits.shape == (3, 7, TINY["vocab_size"])
    assert out.loss is None and out.past_key_values is None


def test_exactly_one_of_ids_or_embeds(model):
    ids = random_ids(2, 4)
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=model.embed_tokens(ids))
    torch.testing.assert_close(model(inputs_embeds=model.embed_tokens(ids)).logits, model(ids).logits)


def test_causality(model):
    ids = random_ids(2, 10)
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % TINY["vocab_size"]
    before, after = model(ids).logits, model(changed).logits
    torch.testing.assert_close(before[:, :6], after[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(before[:, 6:], after[:, 6:])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_rows_alone(model, side):
    rows = [random_ids(5), random_ids(3), random_ids(8)]
    ids, mask = pad_batch(rows, side)
    batch_logits = model(ids, attention_mask=mask).logits
    assert torch.isfinite(batch_logits).all()  # pad queries see nothing: still no NaN
    for i, row in enumerate(rows):
        alone = model(row[None]).logits[0]
        real = mask[i].bool()
        torch.testing.assert_close(batch_logits[i, real], alone, atol=1e-5, rtol=0)


def test_loss_matches_shifted_cross_entropy(model):
    ids = random_ids(3, 9)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, 7] = -100
    out = model(ids, labels=labels)
    vocab = TINY["vocab_size"]
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.layers[0].attn.q.weight.grad is not None


def test_cache_matches_full_forward_and_is_not_mutated(model):
    ids = random_ids(2, 9)
    full = model(ids).logits
    first = model(ids[:, :5], use_cache=True)
    past = first.past_key_values
    assert len(past) == TINY["num_layers"]
    assert past[0][0].shape == (2, TINY["num_heads"], 5, TINY["hidden_size"] // TINY["num_heads"])
    snapshot = [(k.clone(), v.clone()) for k, v in past]
    second = model(ids[:, 5:], past_key_values=past, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, atol=1e-5, rtol=0)
    assert second.past_key_values[0][0].shape[2] == 9
    for (k, v), (k0, v0) in zip(past, snapshot):
        assert torch.equal(k, k0) and torch.equal(v, v0)


def test_positions_beyond_max_are_an_error(model):
    with pytest.raises(ValueError, match="max_positions"):
        model(random_ids(1, TINY["max_positions"] + 1))


# --- generate -------------------------------------------------------------------------

def test_generate_matches_naive_loop(model):
    ids = random_ids(1, 5)
    out = model.generate(ids, max_new_tokens=6)
    assert out.dtype == torch.long and out.shape == (1, 11)
    assert torch.equal(out, naive_greedy(model, ids, torch.ones_like(ids), 6))


def test_generate_left_padded_batch_matches_naive_and_rows_alone(model):
    rows = [random_ids(3), random_ids(6), random_ids(1)]
    ids, mask = pad_batch(rows, "left")
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5)
    assert torch.equal(out, naive_greedy(model, ids, mask, 5))
    for i, row in enumerate(rows):
        assert torch.equal(out[i, -5:], model.generate(row[None], max_new_tokens=5)[0, -5:])


def test_generate_pads_rows_after_eos(model):
    ids, mask = pad_batch([random_ids(4), random_ids(6)], "left")
    free = model.generate(ids, attention_mask=mask, max_new_tokens=5)
    eos = int(free[0, ids.shape[1]])  # row 0's first new token
    pad_id = TINY["vocab_size"] - 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=eos, pad_token_id=pad_id)
    start = ids.shape[1]
    assert out[0, start] == eos and (out[0, start + 1:] == pad_id).all()
    # Row 1 follows the free run up to and including its own first eos.
    new_1, free_1 = out[1, start:], free[1, start:start + out.shape[1] - start]
    hits = (free_1 == eos).nonzero()
    stop = int(hits[0]) + 1 if len(hits) else len(free_1)
    assert torch.equal(new_1[:stop], free_1[:stop])
    assert (new_1[stop:] == pad_id).all()


def test_generate_refuses_right_padding(model):
    ids, mask = pad_batch([random_ids(4), random_ids(2)], "right")
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_generate_sampling_shape(model):
    torch.manual_seed(1)
    out = model.generate(random_ids(2, 3), max_new_tokens=4, do_sample=True, temperature=0.7)
    assert out.shape == (2, 7)


# --- files ----------------------------------------------------------------------------

def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = ReferenceDecoder.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    ids = random_ids(2, 6)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_untied_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ReferenceDecoder(ReferenceConfig(**TINY, tie_word_embeddings=False)).eval()
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" in load_file(tmp_path / "model.safetensors")
    ids = random_ids(1, 4)
    assert torch.equal(ReferenceDecoder.from_pretrained(tmp_path)(ids).logits, model(ids).logits)


def test_load_errors_are_clear(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ReferenceDecoder.from_pretrained(tmp_path / "nowhere")
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        ReferenceDecoder.from_pretrained(tmp_path)

    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        ReferenceDecoder.from_pretrained(tmp_path)

    weights.write_bytes(data)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.up\.weight has shape \(64, 32\), expected \(48, 32\)"):
        ReferenceDecoder.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_layers": 1}))
    with pytest.raises(ValueError, match=r"unexpected keys \['layers\.1\."):
        ReferenceDecoder.from_pretrained(tmp_path)

    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        ReferenceDecoder.from_pretrained(tmp_path)


# --- tokenizer ------------------------------------------------------------------------

def test_tokenizer_round_trip_non_ascii():
    tok = ByteTokenizer()
    text = "héllo wörld — 日本語 🙂"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert all(0 <= i < 256 for i in ids[1:-1]) and len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == f"<bos>{text}<eos>"
    assert tok.vocab_size == ReferenceConfig().vocab_size == 260
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.sep_token_id) == (256, 257, 258, 259)


def test_tokenizer_invalid_utf8_is_replaced():
    tok = ByteTokenizer()
    cut = tok.encode("日")[:2]
    assert tok.decode(cut + tok.encode("a")) == "\ufffda"


def test_tokenizer_batch_padding():
    tok = ByteTokenizer()
    assert tok.padding_side == "right"
    right = tok(["ab", "ü"])
    assert right["input_ids"].tolist() == [[97, 98], [0xC3, 0xBC]]
    right = tok(["abc", "a"])
    assert right["input_ids"].tolist() == [[97, 98, 99], [97, 256, 256]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = tok(["abc", "a"], padding_side="left", return_tensors=None)
    assert left["input_ids"] == [[97, 98, 99], [256, 256, 97]]
    assert left["attention_mask"] == [[1, 1, 1], [0, 0, 1]]
    assert tok.batch_decode(left["input_ids"]) == ["abc", "a"]
    assert tok("x")["input_ids"].shape == (1, 1)
    with pytest.raises(ValueError, match="padding_side"):
        tok("x", padding_side="middle")


def test_tokenizer_feeds_reference_model():
    torch.manual_seed(0)
    tok = ByteTokenizer(padding_side="left")
    model = ReferenceDecoder(ReferenceConfig(hidden_size=16, num_layers=1, num_heads=2,
                                             intermediate_size=32, max_positions=32)).eval()
    batch = tok(["hi", "héllo"])
    out = model.generate(**batch, max_new_tokens=3, eos_token_id=tok.eos_token_id)
    assert out.shape[0] == 2 and out.shape[1] <= batch["input_ids"].shape[1] + 3
