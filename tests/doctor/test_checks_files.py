"""Checkpoints: M10 (checkpoint holds the whole model), in one file or in every weight file
of a folder, read without unpickling anything."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama
from doctor_setups import flagged, peft_lora

import peftkit
from peftkit.doctor import doctor


# -- M10 ----------------------------------------------------------------------------------
def test_m10_checkpoint_that_holds_the_base_model(tmp_path):
    from safetensors.torch import save_file

    pm = peftkit.attach(tiny_llama(), peftkit.LoraConfig(r=4))
    full = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in pm.state_dict().items()}, str(full))
    errors = flagged(doctor(pm, checkpoint=full), "M10", "error")
    assert errors and "base-model tensors" in errors[0].message and "pm.save" in errors[0].fix
    legacy = tmp_path / "model.bin"
    torch.save(pm.base_model.state_dict(), legacy)  # read with weights_only=True
    assert flagged(doctor(pm, checkpoint=legacy), "M10", "error")


def test_m10_not_flagged_on_adapter_files(tmp_path):
    pm = peftkit.attach(tiny_llama(), peftkit.LoraConfig(r=4))
    pm.save(tmp_path / "ours")
    report = doctor(pm, checkpoint=tmp_path / "ours" / "adapter_model.safetensors")
    assert not flagged(report, "M10") and any("no base weights" in n for n in report.notes)
    model = peft_lora()
    model.save_pretrained(tmp_path / "theirs")
    assert not flagged(doctor(model, checkpoint=tmp_path / "theirs" / "adapter_model.safetensors"), "M10")
    with pytest.raises(FileNotFoundError):
        doctor(model, checkpoint=tmp_path / "missing.safetensors")


def add_training_state(folder, model):
    """What a Trainer's checkpoint-N folder holds beside the adapter: training state, which
    is no weights (training_args.bin and rng_state.pth hold pickled objects that must never
    be unpickled)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save({"last_epoch": 1, "_last_lr": [2e-4]}, folder / "scheduler.pt")
    torch.save({"cpu": torch.random.get_rng_state(), "python": Unpickled(folder / "touched")}, folder / "rng_state.pth")
    torch.save(Unpickled(folder / "touched"), folder / "training_args.bin")
    (folder / "trainer_state.json").write_text("{}")
    return folder


class Unpickled:
    """An object whose unpickling creates a file: the proof that a file was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_m10_reads_save_pretrained_and_trainer_checkpoint_folders(tmp_path):
    model = peft_lora()
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    report = doctor(model, checkpoint=saved)
    assert not flagged(report, "M10")
    assert any("saved/ (1 weight file: adapter_model.safetensors)" in n and "no base weights" in n
               for n in report.notes), report.notes
    folder = tmp_path / "checkpoint-500"
    model.save_pretrained(folder)
    add_training_state(folder, model)
    report = doctor(model, checkpoint=folder)
    assert not flagged(report, "M10")
    note = next(n for n in report.notes if n.startswith("M10"))
    assert "training state not read: optimizer.pt, rng_state.pth, scheduler.pt, training_args.bin" in note
    assert not (folder / "touched").exists()


def test_m10_names_every_file_of_a_folder_that_holds_base_weights(tmp_path):
    pm = peftkit.attach(tiny_llama(), peftkit.LoraConfig(r=4))
    folder = tmp_path / "checkpoint-10"
    pm.save(folder)
    add_training_state(folder, pm)
    tiny_llama().save_pretrained(folder, max_shard_size="100KB")  # the whole model, sharded, beside it
    shards = sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    (error,) = flagged(doctor(pm, checkpoint=folder), "M10", "error")
    assert all(f"{shard}: " in error.where for shard in shards) and "adapter_model" not in error.where
    assert error.message.startswith(f"checkpoint-10/ ({len(shards) + 1} weight files: adapter_model.safetensors")
    assert f"in {shards[0]} (" in error.message and "besides 8 adapter tensors" in error.message
    assert not (folder / "touched").exists()


def test_m10_never_unpickles_a_weight_file_that_holds_objects(tmp_path):
    pm = peftkit.attach(tiny_llama(), peftkit.LoraConfig(r=4))
    pm.save(tmp_path / "folder")
    torch.save({"lm_head.weight": torch.zeros(2), "config": Unpickled(tmp_path / "touched")},
               tmp_path / "folder" / "pytorch_model.bin")
    report = doctor(pm, checkpoint=tmp_path / "folder")  # in a folder: noted, the other files checked
    assert any(n.startswith("M10: pytorch_model.bin in") and "never unpickles" in n for n in report.notes)
    assert any("folder/ (1 weight file: adapter_model.safetensors)" in n for n in report.notes)
    with pytest.raises(ValueError, match="never unpickles"):  # the one file asked for: refused
        doctor(pm, checkpoint=tmp_path / "folder" / "pytorch_model.bin")
    assert not (tmp_path / "touched").exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "optimizer.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="holds no weight file"):
        doctor(pm, checkpoint=tmp_path / "empty")

