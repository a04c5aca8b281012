"""Data-parallel training across the processes torchrun starts: PyTorch's own engine
(``torch.distributed``, ``DistributedDataParallel``), nothing home-made on the wire.

Every rank builds the same global batch from the same seed and trains on its contiguous
share of the rows (``rank_rows``), so the shards are disjoint and together cover every
example of the epoch. DDP all-reduces (averages) the adapter gradients; ``train`` weights
rank r's micro-batch loss by n_r / N * world_size, N the label tokens of the whole global
step, so the step's gradient is the one a single process computes on the global batch.
Only rank 0 writes (run folder, log, checkpoints, adapter); the others wait at barriers.

Outside torchrun (no WORLD_SIZE in the environment) the world is one rank and nothing here
does anything.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)  # the longest one rank may wait for the others

# Set by ``launch`` in the workers' environment: their --nproc is the launcher's, not a request
# to launch again.
LAUNCHED = "PEFTKIT_LAUNCHED_NPROC"


class DistributedError(ValueError):
    """A data-parallel setup that cannot run: more ranks than devices, a device kind with no
    backend, --nproc under torchrun, a checkpoint of another rank count."""


class StoppedByRank(Exception):
    """Raised on the other ranks when ``rank`` stopped the run before the first step (the
    doctor's pre-flight); ``rank`` itself raised, and reported, the error."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(f"rank {rank} stopped the run: {message}")
        self.rank, self.message = rank, message


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: torchrun's RANK, WORLD_SIZE and LOCAL_RANK."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "World":
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env:
            return cls()
        rank = int(env["RANK"])
        return cls(rank, int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", rank)))


SINGLE = World()


def rank_device(device: torch.device, world: World) -> torch.device:
    """The device of this rank: on CUDA the GPU of its local rank; CPU ranks share the CPU."""
    if not world.active or device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DistributedError(f"training on several ranks runs on CUDA (NCCL) or the CPU (gloo), not {device.type}; "
                               "pass --device cuda or --device cpu.")
    if world.local_rank >= torch.cuda.device_count():
        raise DistributedError(f"local rank {world.local_rank} has no GPU: this machine has "
                               f"{torch.cuda.device_count()}; start at most that many ranks per node.")
    return torch.device("cuda", world.local_rank)


@contextlib.contextmanager
def joined(device: torch.device) -> Iterator[World]:
    """The world of this process, its process group started for ``device`` (NCCL on CUDA,
    gloo on the CPU) when torchrun started several ranks, and ended when the run ends well
    (after a failure the process exits and torchrun stops the others)."""
    world = World.from_env()
    if not world.active or dist.is_initialized():
        yield world
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Under --fsdp the other ranks wait in the first collective while rank 0 alone reads the
    # whole base and runs the doctor on it: NCCL's 10 minutes is too short for a large model.
    # A rank that dies is noticed by torchrun at once, whatever this is.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    yield world
    dist.destroy_process_group()


# What gloo and NCCL say when a rank in a collective with this one has died.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")


def peer_lost(error: BaseException) -> bool:
    """Whether ``error`` only says that another rank left the run (it died, and its own
    error, printed by that rank, is the one to read)."""
    return isinstance(error, (RuntimeError, dist.DistError)) and any(words in str(error) for words in _PEER_LOST)


def _wire() -> torch.device:
    """Where a collective's tensors live: NCCL moves CUDA tensors only."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def share(rows: int, world: World) -> tuple[int, int]:
    """[start, stop) of this rank's rows among ``rows``: contiguous, the first rows % size
    ranks one row more than the others."""
    base, extra = divmod(rows, world.size)
    start = world.rank * base + min(world.rank, extra)
    return start, start + base + (world.rank < extra)


def rank_rows(batch: dict, world: World) -> dict:
    """This rank's share (``share``) of a global batch: every tensor whose first dimension is
    the rows is cut, anything else (``use_cache``) kept. A rank left without rows (an epoch's
    last batch, shorter than the world) gets the first row with every label masked: it has
    no loss, but still runs forward and backward, so it joins the gradient all-reduce."""
    if not world.active:
        return batch
    rows = len(batch["labels"])
    start, stop = share(rows, world)
    empty = start == stop
    if empty:
        start, stop = 0, 1
    mine = {key: value[start:stop] if isinstance(value, torch.Tensor) and value.dim() and len(value) == rows
            else value for key, value in batch.items()}
    if empty:
        mine["labels"] = torch.full_like(mine["labels"], -100)
    return mine


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel on several ranks (itself on one). DDP reduces only
    the gradients of the parameters that require grad, the adapters'; the frozen base's
    parameters are sent once, rank 0's to every rank when DDP starts, and never again.
    Buffers (rotary tables, an NF4 base's 4-bit codes) are the same on every rank already, so
    they are never broadcast: not at every forward, and not once at the start either."""
    if not world.active:
        return model
    with warnings.catch_warnings():
        # torch 2.13 deprecates broadcast_buffers=False for forward_sync_buffers=False, which
        # still broadcasts every buffer once at the start: an NF4 base's codes are buffers, GBs
        # for an 8B model. Until torch has its init_sync_buffers, the old switch stays, quietly.
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)


def sync_unless(model: torch.nn.Module, skip: bool):
    """``model.no_sync()`` when ``skip`` (the micro-batches of a step before its last: their
    gradients accumulate locally and the last backward all-reduces the sum)."""
    return model.no_sync() if skip and isinstance(model, DistributedDataParallel) else contextlib.nullcontext()


def all_sum(value: float, world: World) -> float:
    """``value`` summed over the ranks."""
    if not world.active:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_wire())
    dist.all_reduce(tensor)
    return float(tensor.item())


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def step_seed(seed: int, step: int, world: World) -> int:
    """The seed of ``step`` on this rank (dropout): a function of the run's seed, the step and
    the rank, so ranks draw different masks and a resumed run needs no generator state of
    the other ranks."""
    return ((seed * 1_000_003 + step) * world.size + world.rank) % 2**64


def agree(world: World, check: Callable[[], None]) -> None:
    """Run ``check`` on rank 0 and give its verdict to every rank: when it raises, rank 0
    re-raises its error and every other rank raises ``StoppedByRank`` with its message.
    The verdict travels as a status and a byte tensor, never a pickle."""
    if not world.active:
        check()
        return
    failure, message = None, b""
    if world.is_main:
        try:
            check()
        except Exception as e:  # any error of the check stops every rank
            failure, message = e, (str(e) or type(e).__name__).encode()
    head = torch.tensor([failure is not None, len(message)], dtype=torch.int64, device=_wire())
    dist.broadcast(head, 0)
    if not head[0]:
        return
    text = torch.tensor(list(message), dtype=torch.uint8, device=_wire()) if world.is_main else \
        torch.empty(int(head[1]), dtype=torch.uint8, device=_wire())
    dist.broadcast(text, 0)
    if failure is not None:
        raise failure
    raise StoppedByRank(0, bytes(text.cpu().tolist()).decode(errors="replace"))


def _same_everywhere(world: World, description, refusal: Callable[[list[int]], str]) -> None:
    """Refuse ranks whose ``description`` (JSON-able) differs from rank 0's: every rank hashes
    it, the hashes are gathered, and rank 0 raises ``DistributedError(refusal(ranks))`` naming
    the ranks that differ (the others ``StoppedByRank``)."""
    if not world.active:
        return
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).digest()
    mine = torch.tensor(list(digest), dtype=torch.uint8, device=_wire())
    every = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(every, mine)

    def check() -> None:
        differ = [rank for rank, theirs in enumerate(every) if not torch.equal(theirs, every[0])]
        if differ:
            raise DistributedError(refusal(differ))

    agree(world, check)


def same_run(world: World, description: dict) -> None:
    """Refuse ranks that were not started on the same run (``description``: its method config,
    options and data). Such ranks would otherwise train a different model each, or hang in a
    collective that only some of them reach."""
    _same_everywhere(world, description, lambda differ: (
        f"rank(s) {differ} were given another run than rank 0 (another method config, option or data "
        "file): start every rank with the same command, model and data."))


def check_nproc(nproc: int, device: torch.device) -> None:
    """Refuse a --nproc this machine cannot run: more ranks than GPUs (CUDA) or cores (CPU),
    or --nproc inside a torchrun that started this process."""
    if nproc < 1:
        raise DistributedError(f"--nproc must be at least 1, got {nproc}.")
    if "WORLD_SIZE" in os.environ:
        raise DistributedError("--nproc starts torchrun, but this process is already one of torchrun's ranks; "
                               "leave --nproc out under torchrun (its --nproc-per-node sets the ranks).")
    if device.type == "cuda":
        count, what = torch.cuda.device_count(), "CUDA GPU(s)"
    elif device.type == "cpu":
        count, what = os.cpu_count() or 1, "CPU core(s)"
    else:
        raise DistributedError(f"--nproc runs ranks on CUDA or the CPU, not {device.type}; pass --device cuda or cpu.")
    if nproc > count:
        raise DistributedError(f"--nproc {nproc} is more ranks than this machine's {count} {what}; "
                               f"pass --nproc {count} or fewer.")


def launched(nproc: int) -> bool:
    """Whether ``launch`` started this process as one of ``nproc`` ranks (its --nproc is in effect)."""
    return os.environ.get(LAUNCHED) == str(nproc) and "WORLD_SIZE" in os.environ


def launch(nproc: int, argv: list[str]) -> int:
    """``peftkit <argv>`` without its --nproc on ``nproc`` ranks of this machine under torchrun
    (a standalone rendezvous on a free port, no restarts: a failed rank ends the run); its
    exit code. (torchrun's own parser would take a --nproc left in for its --nproc-per-node.)"""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
        elif arg == "--nproc":
            skip = True
        else:
            kept.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "--max-restarts", "0", "-m", "peftkit", *kept]
    return subprocess.call(command, env={**os.environ, LAUNCHED: str(nproc)})


# -- FSDP2: the base sharded over the ranks (``--fsdp``) -----------------------------------
def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of ``model``: the children of its largest ``nn.ModuleList``
    (a decoder's or encoder's layers), the unit FSDP2 gathers one at a time; [] when it has none."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        return []
    largest = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return list(largest)


FSDP_ON_ONE_RANK = ("--fsdp shards the base over several ranks, and this run has one; pass --nproc N (N > 1) "
                    "or start it under torchrun, or leave --fsdp out.")


def check_shardable(model: torch.nn.Module, world: World, quantized: bool = False) -> None:
    """Refuse an FSDP2 run that cannot shard: one rank, a 4-bit base (bitsandbytes' packed
    weights are no DTensor), a prompt or prefix (its encoder sits outside the blocks, in
    front of the embeddings), a model without a list of blocks."""
    from .model import PeftModel

    if world.size < 2:
        raise DistributedError(FSDP_ON_ONE_RANK)
    if quantized:
        raise DistributedError("--fsdp cannot shard a 4-bit NF4 base (--quantize nf4); leave one of them out.")
    if isinstance(model, PeftModel) and model.input_adapters:
        raise DistributedError("--fsdp shards LoRA and bottleneck adapters, not a prompt or prefix (its encoder "
                               "sits in front of the blocks); train it without --fsdp (plain data parallel).")
    if not blocks(model):
        raise DistributedError(f"--fsdp found no list of blocks in {type(model).__name__} to shard; "
                               "train it without --fsdp.")


def on_meta(model: torch.nn.Module) -> bool:
    """Whether ``model`` has parameters on the meta device (shapes, no values): the module
    tree that the ranks other than 0 of an FSDP2 run build (``loading.load_model(meta=True)``)."""
    return any(p.is_meta for p in model.parameters())


def _share_buffers(model: torch.nn.Module, world: World) -> None:
    """Rank 0's buffers to every rank (the same module tree everywhere, so the same order).
    A model built on the meta device has none of its buffers' values, and the state dict
    leaves out the non-persistent ones (rotary inverse frequencies). They are small."""
    owned = [(module, name, buffer) for module in model.modules() for name, buffer in module._buffers.items()
             if buffer is not None]
    # A meta rank receives into tensors of its own shapes and dtypes: they must be rank 0's.
    _same_everywhere(world, [(name, list(buffer.shape), str(buffer.dtype)) for _, name, buffer in owned],
                     lambda differ: (f"rank(s) {differ} built the model with other buffers than rank 0 (names, "
                                     "shapes or dtypes), so rank 0's cannot be sent to them; start every rank "
                                     "with the same peftkit, transformers and model."))
    for module, name, buffer in owned:
        wire = torch.empty(buffer.shape, dtype=buffer.dtype, device=_wire()) if buffer.is_meta else buffer.to(_wire())
        dist.broadcast(wire, 0)
        module._buffers[name] = wire.to("cpu" if buffer.is_meta else buffer.device)


def shard(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """``model`` sharded in place with FSDP2 (``fully_shard``) onto ``device``: each block, then
    the root (embeddings, norm, head, what is left). Every parameter becomes a DTensor holding
    this rank's rows; a block's are gathered for its forward and backward only. The gradients
    are reduce-scattered and averaged over the ranks, as DDP averages them, so ``train``'s loss
    weights hold unchanged. Build the optimizer after this: it must hold the sharded parameters.

    Loaded straight into shards: when ranks other than 0 hold the model on the meta device
    (``on_meta``), rank 0's whole model, on the CPU, is the only copy: each of its tensors is
    broadcast in turn and every rank keeps its rows of it (``set_model_state_dict`` with
    ``broadcast_from_rank0``), adapters included, so every rank starts from rank 0's adapter
    initialisation. So no device holds the whole model: rank 0's holds one module's full
    weights at a time while ``fully_shard`` cuts them (the root's: embeddings and head), and
    every rank's one full tensor at a time while it is broadcast; the rest are shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    broadcast = all_sum(float(on_meta(model)), world) > 0
    whole = model.state_dict() if broadcast and world.is_main else {}  # rank 0's tensors, kept alive
    if broadcast:
        _share_buffers(model, world)
    mesh = init_device_mesh(device.type, (world.size,))
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if broadcast:
        set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a sharded one (gathered from every rank: every rank calls this, in the
    same order); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (no communication); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _dcp_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # The base is the model's own, never a checkpoint's: loading leaves it (strict=False), and
    # dcp.load has already refused a checkpoint that lacks one of the trainable tensors.
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def save_sharded(folder, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The trainable weights and the optimizer's state into ``folder`` with
    ``torch.distributed.checkpoint``: each rank writes its shards (every rank calls this).
    The files are keyed by parameter name, not by rank, so they load on any rank count."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=_dcp_options())
    dcp.save({"model": weights, "optimizer": optim}, checkpoint_id=str(folder))


def load_sharded(folder, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """``save_sharded``'s reverse, resharded onto this run's ranks (every rank calls this)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, optim = get_state_dict(model, optimizer, options=_dcp_options())
    state = {"model": weights, "optimizer": optim}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_dcp_options(strict=False))
