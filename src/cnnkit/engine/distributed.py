"""Training on several processes: `torchrun --nproc_per_node=N -m cnnkit train ...`.

torchrun starts one process per device and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT in each; `setup` reads them, picks the backend (NCCL for CUDA, with process `LOCAL_RANK`
on `cuda:LOCAL_RANK`; gloo on CPUs) and starts the process group. The model is wrapped in
DistributedDataParallel, which broadcasts rank 0's weights at construction and averages the gradients
of every step over the processes, so all replicas stay identical.

Data: each process reads its share of a global batch. The training order is `DistributedSampler`'s
(a permutation seeded by seed + epoch, rank r takes positions r, r + W, r + 2W ...), which a single
process uses as well (with W = 1): the union of the shards of step k is exactly the k-th global batch
of a one-process run, whatever the number of processes. Validation uses `ShardSampler`, which gives
every image to exactly one process (no padding repeats); the tasks gather predictions, or sum their
confusion matrices and counters, over the processes before computing a metric, so mAP and mIoU are
those of the whole validation set, never an average of per-process figures.

Without torchrun's variables (or with WORLD_SIZE=1) nothing here starts a process group and every
helper is a no-op for one process.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, Sampler

from cnnkit.errors import UsageError


def env_world_size() -> int:
    """WORLD_SIZE as torchrun set it (1 when it did not)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank; torchrun's RANK also before the process group starts and after it ends."""
    if is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0) if env_world_size() > 1 else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0) if env_world_size() > 1 else 0


def is_main() -> bool:
    """Rank 0: the only process that logs and writes files."""
    return rank() == 0


def setup(device: torch.device) -> tuple[torch.device, bool]:
    """Start the process group when torchrun asked for more than one process.

    Returns (this process's device, whether this call started the group, so `cleanup` ends it).
    A CUDA device becomes `cuda:LOCAL_RANK`; the backend is NCCL for CUDA and gloo for CPUs.
    """
    if env_world_size() <= 1 or is_initialized():
        return device, False
    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed", fix="run a single process (without torchrun)")
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if local_rank() >= n:
            raise UsageError(f"process LOCAL_RANK={local_rank()} has no GPU of its own ({n} visible)",
                             fix=f"use torchrun --nproc_per_node={n} or fewer, or --device cpu")
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        dist.init_process_group(backend="gloo")
    return device, True


def cleanup(started: bool) -> None:
    """End the process group if `setup` started it."""
    if started and is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. generates or unpacks a data set), then the others do."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every process."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def per_process_batch(global_batch: int) -> int:
    """`--batch-size` is the global batch: each of the W processes reads global / W images a step."""
    w = world_size()
    if global_batch % w:
        raise UsageError(f"--batch-size {global_batch} is the global batch and does not split evenly over "
                         f"{w} processes", fix=f"use a multiple of {w}, e.g. --batch-size {max(w, global_batch // w * w)}")
    return global_batch // w


def train_sampler(dataset, seed: int) -> DistributedSampler:
    """The training order: a permutation seeded by seed + epoch (call `set_epoch` every epoch), split
    r::W over the processes; the tail that does not split evenly is dropped, so every process takes
    the same number of steps. With one process this is a plain seeded shuffle of every item."""
    w = world_size()
    if len(dataset) < w:
        raise UsageError(f"{len(dataset)} training image(s) for {w} processes", fix="use fewer processes")
    return DistributedSampler(dataset, num_replicas=w, rank=rank(), shuffle=True, seed=seed, drop_last=True)


class ShardSampler(Sampler[int]):
    """Items rank, rank + W, rank + 2W ... in order: every item is read by exactly one process and
    none twice (DistributedSampler pads its shards with repeats, which would count twice in metrics).
    Shards may differ in length by one; evaluation runs no collective per batch, so that is fine."""

    def __init__(self, length: int, rank: int, world: int):
        self.length, self.rank, self.world = length, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world))


def val_sampler(dataset) -> ShardSampler | None:
    """The validation shard of this process; None (sequential, the whole set) for one process."""
    if world_size() == 1:
        return None
    return ShardSampler(len(dataset), rank(), world_size())


def is_sharded(loader) -> bool:
    """Does `loader` read only this process's shard, so that its results must be gathered?"""
    return isinstance(getattr(loader, "sampler", None), ShardSampler) and world_size() > 1


def _cpu(v: Any) -> Any:
    return v.detach().cpu() if isinstance(v, torch.Tensor) else v


def sum_across(*values: Any) -> list[Any]:
    """Each value (number or tensor) summed over the processes: counters, loss sums, confusion matrices."""
    if not is_initialized() or world_size() == 1:
        return list(values)
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, [_cpu(v) for v in values])
    return [functools.reduce(operator.add, column) for column in zip(*parts)]


def gather_ordered(items: Sequence[Any]) -> list[Any]:
    """The per-item results of a `ShardSampler` evaluation from every process, back in dataset order.

    Item i of the dataset was read by process i % W as its (i // W)-th item. A list that holds only a
    prefix of each shard (the first few pictures) gives the matching prefix of the dataset."""
    if not is_initialized() or world_size() == 1:
        return list(items)
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, [_tree_cpu(x) for x in items])
    return interleave(parts)


def interleave(parts: Sequence[Sequence[Any]]) -> list[Any]:
    """Shards r::W (one list per rank) -> the items in dataset order, up to the first one missing."""
    w, out = len(parts), []
    for i in range(sum(len(p) for p in parts)):
        shard, j = parts[i % w], i // w
        if j >= len(shard):
            break
        out.append(shard[j])
    return out


def _tree_cpu(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _tree_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_tree_cpu(v) for v in x)
    return _cpu(x)


def average(values: Sequence[float], device: torch.device) -> list[float]:
    """Means over the processes of a few numbers (a step's loss and its parts), one all-reduce."""
    if not is_initialized() or world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / world_size()).tolist()


@torch.no_grad()
def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every process, so that all of them evaluate
    the model that rank 0 saves: each replica's statistics last moved with its own share of the batch."""
    if not is_initialized() or world_size() == 1:
        return
    for b in model.buffers():
        dist.broadcast(b, src=0)


class DistributedModel(DistributedDataParallel):
    """DistributedDataParallel that also answers the wrapped model's own attributes (S, B, img_size,
    cnnkit_name ...), so a task's loss needs no knowledge of the wrapper."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP and torch.compile wrappers (its state_dict keys carry no `module.` or
    `_orig_mod.` prefix)."""
    from cnnkit.models.backbones import _unwrap

    return _unwrap(model)


def wrap(model: torch.nn.Module, device: torch.device, *, find_unused_parameters: bool = False) -> torch.nn.Module:
    """The model DDP-wrapped when several processes train, else the model itself.

    `find_unused_parameters` is for a backbone that freezes and unfreezes during the run: DDP then
    accepts steps in which some parameters get no gradient."""
    if not is_initialized() or world_size() == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedModel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def convert_sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`--sync-bn`: BatchNorm statistics computed over the global batch (nn.SyncBatchNorm).

    torch's SyncBatchNorm synchronises GPU tensors only: on CPUs (gloo) its training forward raises,
    so this is a clear error there. With one process there is nothing to synchronise."""
    if world_size() == 1:
        return model
    if device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA: torch's SyncBatchNorm synchronises GPU tensors only, not CPU (gloo)",
                         fix="drop --sync-bn on CPUs (each process then normalises with its own share of the batch)")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def seed_for_process(seed: int, epoch: int) -> int:
    """A seed for a rank > 0 resuming at `epoch` (the checkpoint holds rank 0's random state only)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, rank(), epoch]).generate_state(1)[0])
