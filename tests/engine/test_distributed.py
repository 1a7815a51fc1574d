"""torchrun / DistributedDataParallel on CPUs (gloo): two processes with a fixed global batch train
exactly as one process does, a run resumes on another number of processes, and every task trains
under `torchrun --nproc_per_node=2 -m cnnkit train ...`.

The equivalence run uses a model without BatchNorm (vgg11, dropout 0): per-process BatchNorm
statistics differ from global-batch ones by design, and torch's SyncBatchNorm works on CUDA only.

It computes in float64 (torch's default dtype set in every process): two processes sum a gradient in
another order than one process does, and in fp32 that rounding (relative 2^-24 a sum, grown through eight
steps of training) reached 3.7e-5 on an AVX2 CPU, more than any fixed fp32 tolerance can honestly allow.
In float64 the same rounding stays below 1e-12, so a tolerance of 1e-9 holds on every CPU and still
catches a real divergence by many orders of magnitude: a run where one process skips one optimizer
step is shown to fail the same comparison.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.engine import distributed as dist
from cnnkit.engine.config import TrainConfig
from cnnkit.errors import UsageError

from tests.conftest import CLASSES, _draw

WORLD = 2
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def odd_shapes(tmp_path_factory):
    """64 training images (4 classes) and 23 validation images: the two validation shards differ in length."""
    root = tmp_path_factory.mktemp("odd_shapes")
    rng = np.random.default_rng(1)
    for split, n in (("train", 16), ("val", 6)):
        for k, c in enumerate(CLASSES):
            (root / split / c).mkdir(parents=True)
            for i in range(n - (split == "val" and k == 3)):
                Image.fromarray(_draw(c, rng)).save(root / split / c / f"{i}.png")
    return root


def _cfg(data, project, name, **kw) -> TrainConfig:
    base = dict(task="classify", model="vgg11", model_kwargs={"width": 0.125, "pool_size": 1, "dropout": 0.0},
                data=str(data), epochs=2, batch_size=16, img_size=32, lr=0.05, warmup_epochs=0.5, augment=False,
                ema=True, ema_decay=0.9, precision="fp32", channels_last="off", workers=0, seed=7,
                project=str(project), name=name, plots=False, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TOL = 1e-9  # float64 (module doc)


class float64:
    """torch's default dtype float64 inside the block: the models, inputs and losses of `fit` follow it."""

    def __enter__(self):
        self.before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.before)


def _skip_one_step(rank_to_skip: int, step: int) -> None:
    """Make process `rank_to_skip` skip its optimizer update at its `step`-th step (backward still runs, so
    the gradient all-reduce stays in step): the processes' weights then really diverge."""
    from cnnkit.engine import loop

    optimize, calls = loop._optimize, [0]

    def maybe_skip(model, loss, optimizer, scaler, clip_grad):
        calls[0] += 1
        if dist.rank() == rank_to_skip and calls[0] == step:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            return
        optimize(model, loss, optimizer, scaler, clip_grad)

    loop._optimize = maybe_skip


def _worker(rank: int, world: int, port: int, cfg: dict, out: str, keep_epoch1: str, skip_step: int = 0) -> None:
    """One process of a torchrun-like launch: torchrun's variables, then `fit` as the CLI calls it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    from cnnkit.engine.trainer import fit

    if skip_step:
        _skip_one_step(1, skip_step)

    losses: list[list] = []
    run = Path(cfg["project"]) / "classify" / cfg["name"]

    def on_step(epoch, step, loss):
        losses.append([epoch, step, loss])
        if rank == 0 and (epoch, step) == (1, 0) and keep_epoch1:  # last.pt as epoch 1 left it
            Path(keep_epoch1, "weights").mkdir(parents=True)
            shutil.copy(run / "weights" / "last.pt", Path(keep_epoch1, "weights", "last.pt"))

    result = fit(TrainConfig.from_dict(cfg), on_step=on_step, log=lambda *a: None)
    assert not dist.is_initialized()  # fit ended the process group it started
    Path(f"{out}.{rank}").write_text(json.dumps({"losses": losses, "run_dir": str(result.run_dir)}))


@pytest.fixture(scope="module")
def runs(odd_shapes, tmp_path_factory):
    """The same training with 2 processes (spawned, as torchrun would) and with 1 process."""
    tmp = tmp_path_factory.mktemp("ddp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = _cfg(odd_shapes, tmp / "runs", "two")
        torch.multiprocessing.start_processes(
            _worker, args=(WORLD, _free_port(), cfg.to_dict(), str(tmp / "out"), str(tmp / "resumed")),
            nprocs=WORLD, start_method="spawn")
        from cnnkit.engine.trainer import fit

        one: list[list] = []
        with float64():
            fit(_cfg(odd_shapes, tmp / "runs", "one"), on_step=lambda e, s, l: one.append([e, s, l]),
                log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    outs = [json.loads(Path(f"{tmp / 'out'}.{r}").read_text()) for r in range(WORLD)]
    return {"tmp": tmp, "two": outs, "one": one, "two_dir": tmp / "runs" / "classify" / "two",
            "one_dir": tmp / "runs" / "classify" / "one"}


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "weights" / "last.pt", map_location="cpu", weights_only=True)


def _assert_same_weights(a: dict, b: dict) -> None:
    for key in ("state_dict", "train_state_dict"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert a[key][k].dtype == torch.float64 or not a[key][k].is_floating_point()
            torch.testing.assert_close(a[key][k], b[key][k], rtol=TOL, atol=TOL, msg=f"{key}[{k}]")


def test_two_processes_train_exactly_as_one(runs):
    one, two = runs["one"], runs["two"]
    assert len(one) == 8  # 64 images / global batch 16 = 4 steps, 2 epochs
    for r in range(WORLD):  # every process logs the loss of the global batch
        assert [x[:2] for x in two[r]["losses"]] == [x[:2] for x in one]
        assert [x[2] for x in two[r]["losses"]] == pytest.approx([x[2] for x in one], rel=TOL, abs=TOL)
    assert len({round(x[2], 4) for x in one}) > 1  # the loss moves: the weights did train
    a, b = _weights(runs["two_dir"]), _weights(runs["one_dir"])
    _assert_same_weights(a, b)
    assert not any(k.startswith("module.") for k in a["state_dict"])  # the bare model's keys
    init = b["train_state_dict"]["features.0.weight"]
    assert not torch.equal(init, torch.zeros_like(init))


def test_the_comparison_fails_when_one_process_skips_a_step(runs, odd_shapes, tmp_path):
    """The same 2-process run, but process 1 skips its 3rd optimizer update: the weights rank 0 saves
    then differ from the 1-process run's far beyond the tolerance, so the check above can fail."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = _cfg(odd_shapes, tmp_path / "runs", "skipped")
        torch.multiprocessing.start_processes(
            _worker, args=(WORLD, _free_port(), cfg.to_dict(), str(tmp_path / "out"), "", 3),
            nprocs=WORLD, start_method="spawn")
    finally:
        torch.set_num_threads(threads)
    diverged = _weights(tmp_path / "runs" / "classify" / "skipped")
    with pytest.raises(AssertionError):
        _assert_same_weights(diverged, _weights(runs["one_dir"]))
    worst = max(float((diverged["state_dict"][k] - v).abs().max())
                for k, v in _weights(runs["one_dir"])["state_dict"].items())
    assert worst > 1e3 * TOL  # not a near miss: a real divergence is orders of magnitude above the tolerance


def test_validation_metrics_are_gathered_from_every_process(runs):
    """23 validation images over 2 processes (12 + 11): counted once each, metrics of the whole set."""
    rows = {name: list(csv.DictReader(open(runs[f"{name}_dir"] / "metrics.csv"))) for name in ("one", "two")}
    assert [float(r["val_images"]) for r in rows["two"]] == [23.0, 23.0]
    for r1, r2 in zip(rows["one"], rows["two"]):
        assert float(r2["val_top1"]) == pytest.approx(float(r1["val_top1"]))
        assert float(r2["val_loss"]) == pytest.approx(float(r1["val_loss"]), rel=1e-5)
        assert float(r2["train_loss"]) == pytest.approx(float(r1["train_loss"]), rel=1e-5)


def test_only_rank_0_writes(runs):
    two = runs["two"]
    assert two[0]["run_dir"] == two[1]["run_dir"] == str(runs["two_dir"])  # one folder, chosen by rank 0
    assert sorted(p.name for p in runs["two_dir"].parent.iterdir()) == ["one", "two"]
    assert (runs["two_dir"] / "config.yaml").is_file() and (runs["two_dir"] / "weights" / "best.pt").is_file()


def test_two_process_run_resumes_on_one_process(runs):
    """last.pt of epoch 1 of the 2-process run, resumed with 1 process: the same epoch 2, the same weights."""
    from cnnkit.engine.trainer import fit

    last = runs["tmp"] / "resumed" / "weights" / "last.pt"
    assert torch.load(last, weights_only=True)["epoch"] == 0
    steps: list[list] = []
    with float64():
        result = fit(_cfg("unused", "unused", "unused"), resume=str(last),
                     on_step=lambda e, s, l: steps.append([e, s, l]), log=lambda *a: None)
    assert result.run_dir == last.parent.parent
    second = [x for x in runs["two"][0]["losses"] if x[0] == 1]
    assert [x[:2] for x in steps] == [x[:2] for x in second]
    assert [x[2] for x in steps] == pytest.approx([x[2] for x in second], rel=TOL, abs=TOL)
    resumed = _weights(result.run_dir)
    assert resumed["epoch"] == 1
    _assert_same_weights(resumed, _weights(runs["two_dir"]))


@pytest.mark.slow
def test_frozen_then_unfrozen_backbone_trains_as_one_process(odd_shapes, tmp_path):
    """A backbone frozen in epoch 1 (no gradients, DDP's find_unused_parameters) and trained in epoch 2."""
    from cnnkit.engine.trainer import fit

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kw = dict(freeze_backbone=True, unfreeze_at=2)
        cfg = _cfg(odd_shapes, tmp_path / "runs", "two", **kw)
        torch.multiprocessing.start_processes(
            _worker, args=(WORLD, _free_port(), cfg.to_dict(), str(tmp_path / "out"), str(tmp_path / "resumed")),
            nprocs=WORLD, start_method="spawn")
        one: list[float] = []
        with float64():  # as the workers compute (module doc)
            fit(_cfg(odd_shapes, tmp_path / "runs", "one", **kw), on_step=lambda e, s, l: one.append(l),
                log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    two = [x[2] for x in json.loads(Path(f"{tmp_path / 'out'}.0").read_text())["losses"]]
    assert two == pytest.approx(one, rel=TOL, abs=TOL)
    a, b = _weights(tmp_path / "runs" / "classify" / "two"), _weights(tmp_path / "runs" / "classify" / "one")
    _assert_same_weights(a, b)


@pytest.mark.parametrize("n", [64, 67, 23])
def test_single_process_order_is_the_union_of_the_shards(n):
    """Step k of one process reads exactly the images that step k of W processes reads, every epoch."""
    from torch.utils.data import DistributedSampler

    data = list(range(n))
    for world in (2, 4):
        global_batch, per = 8 * world, 8
        for epoch in (0, 3):
            single = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=11, drop_last=True)
            single.set_epoch(epoch)
            order = list(single)
            shards = []
            for r in range(world):
                s = DistributedSampler(data, num_replicas=world, rank=r, shuffle=True, seed=11, drop_last=True)
                s.set_epoch(epoch)
                shards.append(list(s))
            steps = min(len(order) // global_batch, len(shards[0]) // per)
            assert steps == n // global_batch  # the same number of steps with drop_last
            for k in range(steps):
                union = sorted(i for sh in shards for i in sh[k * per:(k + 1) * per])
                assert union == sorted(order[k * global_batch:(k + 1) * global_batch])
        assert order != sorted(order)  # shuffled


def test_validation_shards_cover_every_item_once():
    for n in (0, 1, 23, 24):
        for world in (1, 2, 3, 5):
            shards = [list(dist.ShardSampler(n, r, world)) for r in range(world)]
            assert [len(dist.ShardSampler(n, r, world)) for r in range(world)] == [len(s) for s in shards]
            assert sorted(i for s in shards for i in s) == list(range(n))
            assert dist.interleave(shards) == list(range(n))  # gathered back in dataset order
            assert dist.interleave([s[:2] for s in shards]) == list(range(min(n, 2 * world)))


def test_global_batch_must_split_evenly_and_sync_bn_needs_cuda(monkeypatch):
    assert dist.per_process_batch(16) == 16  # one process: the batch as given
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    with pytest.raises(UsageError, match="global batch.*3 processes"):
        dist.per_process_batch(16)
    assert dist.per_process_batch(18) == 6
    with pytest.raises(UsageError, match="--sync-bn needs CUDA"):
        dist.convert_sync_batchnorm(torch.nn.BatchNorm2d(3), torch.device("cpu"))


def test_without_torchrun_nothing_is_distributed(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    device, started = dist.setup(torch.device("cpu"))
    assert (device, started, dist.is_initialized()) == (torch.device("cpu"), False, False)
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    model = torch.nn.Conv2d(1, 1, 1)
    assert dist.wrap(model, device) is model and dist.val_sampler([1, 2, 3]) is None
    assert dist.sum_across(1, 2.5) == [1, 2.5] and dist.average([1.0, 2.0], device) == [1.0, 2.0]


# -- the real command line: torchrun --nproc_per_node=2 -m cnnkit train <task> ------------------------------------

TINY_SCENES = {"n_train": 16, "n_val": 5, "img_size": 64, "seed": 1}  # the tiny_scenes fixture (conftest)


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "-m", "cnnkit", "train", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classify", "detect", "segment"])
def test_torchrun_trains_every_task(task, odd_shapes, tiny_scenes, tmp_path):
    data = {"classify": str(odd_shapes), "detect": str(next(tiny_scenes.glob("*.yaml"))), "segment": str(tiny_scenes)}
    model = {"classify": ["--model", "vgg11_bn", "--width", "0.125", "--pool-size", "1"],
             "detect": ["--model", "yolov1_fast", "--width", "0.125", "--img-size", "64"],
             "segment": ["--model", "unet", "--backbone", "vgg11", "--width", "0.25", "--weights", "none",
                         "--img-size", "64"]}[task]
    proc = _torchrun([task, "--data", data[task], *model, "--epochs", "1", "--batch-size", "8", "--max-steps", "2",
                      "--workers", "0", "--project", str(tmp_path / "runs"), "--name", "t", "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("epoch 1/1") == 1, proc.stdout  # rank 1 stays silent
    assert proc.stdout.count("results in") == 1
    run = tmp_path / "runs" / task / "t"
    assert [p.name for p in run.parent.iterdir()] == ["t"]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    n_val = 23 if task == "classify" else 5  # uneven shards, every image counted once
    assert float(rows[0]["val_images"]) == n_val
    ckpt = torch.load(run / "weights" / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    assert ckpt["config"]["batch_size"] == 8


@pytest.mark.slow
def test_torchrun_batch_not_divisible_is_a_one_line_error(odd_shapes, tmp_path):
    proc = _torchrun(["classify", "--data", str(odd_shapes), "--batch-size", "7", "--epochs", "1",
                      "--project", str(tmp_path / "runs")], tmp_path)
    assert proc.returncode != 0
    assert "--batch-size 7 is the global batch and does not split evenly over 2 processes" in proc.stderr
