"""The training loop's arithmetic: the loss of a step normalised over its label tokens
whatever the micro-batching, and the gradient clipped to ``max_grad_norm``."""

from __future__ import annotations

import json

import pytest
import torch

import peftkit
from peftkit import cli
from peftkit.data import Example, collate
from peftkit.train import accumulate_gradients, train
from helpers import reference_run_inputs, tiny_reference


def _rows(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(3, 200, (n,), generator=gen).tolist()
        rows.append(Example(input_ids=ids, labels=ids))
    return rows


def _model():
    torch.manual_seed(0)
    pm = peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=4, target_modules=["q", "v"]))
    with torch.no_grad():  # B away from zero so that every LoRA parameter gets a gradient
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return pm


def _grads(pm):
    return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


def test_two_micro_batches_of_b_give_the_gradient_of_one_batch_of_2b_with_uneven_lengths():
    rows = _rows([30, 28, 5, 3])  # the second micro-batch has far fewer label tokens
    whole, first, second = collate(rows, 0), collate(rows[:2], 0), collate(rows[2:], 0)

    one = _model()
    loss_one = accumulate_gradients(one, [whole])
    two = _model()
    loss_two = accumulate_gradients(two, [first, second])

    assert loss_two == pytest.approx(loss_one, rel=1e-5)
    for name, grad in _grads(one).items():
        torch.testing.assert_close(_grads(two)[name], grad, rtol=1e-4, atol=1e-6)
    # The mean of the two micro-batch means, what the loop did before, is a different gradient.
    old = _model()
    ((old(**first).loss + old(**second).loss) / 2).backward()
    differences = [(_grads(old)[n] - g).norm() / g.norm() for n, g in _grads(one).items()]
    assert max(differences) > 0.05


def test_a_micro_batch_with_no_label_token_adds_nothing():
    rows = _rows([12, 9])
    batch = collate(rows, 0)
    empty = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    one, two = _model(), _model()
    assert accumulate_gradients(two, [batch, empty]) == pytest.approx(accumulate_gradients(one, [batch]))
    for name, grad in _grads(one).items():
        torch.testing.assert_close(_grads(two)[name], grad)


def test_the_gradient_is_clipped_to_max_grad_norm_and_its_norm_logged(monkeypatch):
    seen = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    batches = [collate(_rows([20, 16]), 0)]
    logged = []
    train(_model(), batches, steps=2, lr=1e-3, progress=False, max_grad_norm=1e-3, on_step=logged.append)
    assert all(norm <= 1e-3 * (1 + 1e-4) for norm in seen)
    assert all(record["grad_norm"] > 1e-3 for record in logged)  # the norm before clipping

    seen.clear()
    logged.clear()
    train(_model(), batches, steps=1, lr=1e-3, progress=False, max_grad_norm=0, on_step=logged.append)
    assert seen[0] == pytest.approx(logged[0]["grad_norm"], rel=1e-4)  # 0: measured, not clipped


def test_max_steps_is_the_option_and_the_log_has_the_norm_and_held_out_loss(tmp_path, capsys):
    model, data = reference_run_inputs(tmp_path)
    out = tmp_path / "run"
    assert cli.main(["train", "--model", str(model), "--data", str(data), "--out", str(out), "--no-progress",
                     "--max-steps", "4", "--max-grad-norm", "0.5", "--eval-every", "2"]) == 0
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["grad_norm"] > 0 for r in records)
    assert ["eval_loss" in r for r in records] == [False, True, False, True]  # --eval-every 2
    assert 0 < records[3]["eval_loss"] < records[1]["eval_loss"] * 2 and 0 <= records[3]["eval_accuracy"] <= 1
    assert json.loads((out / "run.json").read_text())["options"]["max_grad_norm"] == 0.5
    capsys.readouterr()


def _dataset(n: int = 10):
    from peftkit.data import Dataset

    return Dataset("tokens", _rows([6 + i % 4 for i in range(n)]))


def test_each_epoch_draws_every_example_once_in_a_new_order():
    from peftkit.data import EpochBatches

    batches = EpochBatches(_dataset(10), batch_size=3, pad_id=0, seed=7)
    assert len(batches) == 4  # 3 + 3 + 3 + 1
    orders = [batches.order(epoch) for epoch in range(3)]
    for order in orders:
        assert sorted(order) == list(range(10))
    assert orders[0] != orders[1] != orders[2]
    rows = [batches.at(k)["input_ids"].shape[0] for k in range(8)]
    assert rows == [3, 3, 3, 1, 3, 3, 3, 1]
    assert EpochBatches(_dataset(10), 3, 0, seed=7).order(1) == orders[1]  # the seed and epoch alone decide


def test_a_run_stopped_mid_epoch_resumes_to_the_uninterrupted_adapter(tmp_path):
    from peftkit.data import EpochBatches

    def run(directory, stop_at=None, resume=False):
        pm = _model()
        batches = EpochBatches(_dataset(10), batch_size=3, pad_id=0, seed=1)

        def on_step(record):
            if record["step"] == stop_at:
                raise KeyboardInterrupt  # killed after the checkpoint of the step before
        train(pm, batches, steps=7, lr=1e-2, progress=False, checkpoint_dir=directory, checkpoint_every=1,
              resume=resume, on_step=on_step)
        return {n: p.detach().clone() for n, p in pm.trainable_parameters().items()}

    whole = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", stop_at=6)  # step 5 is in the second epoch (4 batches an epoch)
    resumed = run(tmp_path / "cut", resume=True)
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)
