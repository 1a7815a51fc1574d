"""Crash safety: a run killed with SIGKILL at random moments and restarted with --resume ends with the
weights of an uninterrupted run, and no checkpoint or result file is ever half-written; SIGINT and
SIGTERM save a checkpoint of the current step and exit 130 / 143, and --resume from that mid-epoch
checkpoint continues exactly.

Exactness holds on a CPU in fp32 with a fixed seed and thread count (OMP_NUM_THREADS=1 in the
subprocesses): CPU kernels are deterministic there, so "equal" below means bitwise equal.
"""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from cnnkit.engine import checkpoint as ck
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.loop import TrainingInterrupted
from cnnkit.engine.trainer import fit

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 8
KILLS = 4
RANDOM_EPOCHS = 24  # the random-kill test: long enough that most kills land in training (an epoch takes ~0.15 s here)


def _argv(data, project, name, epochs=EPOCHS) -> list[str]:
    return ["train", "classify", "--data", str(data), "--model", "vgg11_bn", "--width", "0.125", "--pool-size", "1",
            "--epochs", str(epochs), "--batch-size", "16", "--lr", "0.02", "--precision", "fp32", "--workers", "0",
            "--channels-last", "off", "--seed", "3", "--no-progress", "--project", str(project), "--name", name]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cnnkit", *args], cwd=REPO, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_training(proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Read stdout until the line `fit` logs just before the first step (`... -> runs/...`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return False  # exited
        if " -> " in line:
            return True
    raise AssertionError("training did not start")


def _check_every_file(run: Path, epochs: int = EPOCHS) -> list[str]:
    """Every checkpoint and result file present parses completely; returns the names checked."""
    seen = []
    for name in ("last.pt", "best.pt"):
        p = run / "weights" / name
        if p.exists():
            c = ck.load_checkpoint(p)  # weights_only; a truncated zip raises WeightsError
            assert {"state_dict", "optimizer", "scheduler", "rng", "epoch", "config"} <= set(c), p
            assert all(torch.isfinite(v).all() for v in c["state_dict"].values() if v.is_floating_point())
            seen.append(name)
    if (run / "config.yaml").exists():
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert isinstance(cfg, dict) and cfg["task"] == "classify" and cfg["epochs"] == epochs
        seen.append("config.yaml")
    if (run / "metrics.csv").exists():
        with open(run / "metrics.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert len(rows) >= 2 and all(len(r) == len(rows[0]) for r in rows), rows
        assert [int(r[0]) for r in rows[1:]] == list(range(1, len(rows))), rows
        seen.append("metrics.csv")
    for png in sorted(run.glob("*.png")):
        with Image.open(png) as im:
            im.load()  # a truncated PNG raises here
        seen.append(png.name)
    if (run / "report.html").exists():
        assert (run / "report.html").read_text().rstrip().endswith("</html>")
        seen.append("report.html")
    return seen


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return ck.load_checkpoint(path)["state_dict"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_time_s")} for r in csv.DictReader(f)]


pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread (conftest.one_thread)


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(shapes_dir, tmp_path, random_seed):
    seed = random_seed  # CNNKIT_TEST_SEED replays the delays
    rng = random.Random(seed)
    project = tmp_path / "runs"
    epochs = RANDOM_EPOCHS
    reference = _start(_argv(shapes_dir, project, "reference", epochs))  # runs alongside the killed one
    run = project / "classify" / "killed"
    kills: list[str] = []
    checked: set[str] = set()
    finished = False  # a kill drawn after the run's end (its last pictures and report) finds it done: that is fine
    try:
        while len(kills) < KILLS and not finished:
            last = run / "weights" / "last.pt"
            args = _argv(shapes_dir, project, "killed", epochs) + (["--resume", str(last)] if last.exists() else ["--exist-ok"])
            proc = _start(args)
            started = _wait_for_training(proc)
            delay = rng.uniform(0.0, 1.5)
            time.sleep(delay)
            if not started or proc.poll() is not None:
                out, err = proc.communicate()
                if proc.returncode != 0 or not kills:
                    pytest.fail(f"the run ended before kill {len(kills) + 1} (seed {seed}): rc {proc.returncode}\n{err[-2000:]}")
                finished = True
                kills.append(f"resumed, finished within +{delay:.2f}s")
                break
            proc.kill()  # SIGKILL: no handler, no cleanup
            proc.communicate()
            assert proc.returncode == -signal.SIGKILL
            epoch = ck.load_checkpoint(last)["epoch"] + 1 if last.exists() else 0
            kills.append(f"{'resumed' if '--resume' in args else 'fresh'} +{delay:.2f}s -> {epoch} epochs saved")
            checked.update(_check_every_file(run, epochs))
        last = run / "weights" / "last.pt"
        final = _start(_argv(shapes_dir, project, "killed", epochs) + (["--resume", str(last)] if last.exists() else ["--exist-ok"]))
        out, err = final.communicate(timeout=300)
        assert final.returncode == 0, err[-3000:]
        out_ref, err_ref = reference.communicate(timeout=300)
        assert reference.returncode == 0, err_ref[-3000:]
    finally:
        for p in (reference,):
            if p.poll() is None:
                p.kill()
    ref = project / "classify" / "reference"
    print(f"seed {seed}; kills: {kills}; files checked after kills: {sorted(checked)}")
    assert len(kills) == KILLS and sum("epochs saved" in k for k in kills) >= 2, kills  # at least two real kills
    _check_every_file(run, epochs)
    _assert_same_weights(run / "weights" / "last.pt", ref / "weights" / "last.pt")
    _assert_same_weights(run / "weights" / "best.pt", ref / "weights" / "best.pt")
    assert _rows(run) == _rows(ref)  # losses and validation metrics of every epoch, to the last digit
    assert not list(run.rglob("*.tmp"))  # temp files of killed writes are removed on --resume


def _cfg(shapes_dir, tmp_path, **kw) -> TrainConfig:
    base = dict(task="classify", model="vgg11_bn", model_kwargs={"width": 0.125, "pool_size": 1},
                data=str(shapes_dir), epochs=2, batch_size=16, img_size=32, lr=0.02, project=str(tmp_path / "runs"),
                name="t", progress=False, plots=False, seed=3, precision="fp32", channels_last="off", workers=0,
                ema=True, ema_decay=0.9)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("freeze", [0, 2], ids=["all-layers-train", "frozen-early-layers-folded"])
def test_sigint_mid_epoch_saves_the_step_and_resume_is_exact(shapes_dir, tmp_path, workers, freeze):
    """Ctrl-C at epoch 2, step 2 of 4 (augmentation and dropout draw random numbers; with workers the
    loader's seed comes from the epoch's start): the resumed run equals the uninterrupted one bitwise.
    With `freeze_early` the fp32 run folds the frozen BatchNorms after the resume restored the weights."""
    handler_before = signal.getsignal(signal.SIGINT)
    full: list[tuple] = []
    res_full = fit(_cfg(shapes_dir, tmp_path, name="full", workers=workers, freeze_early=freeze),
                   on_step=lambda e, s, l: full.append((e, s, l)), log=lambda *_: None)
    assert signal.getsignal(signal.SIGINT) is handler_before

    cut: list[tuple] = []

    def ctrl_c(e, s, l):
        cut.append((e, s, l))
        if (e, s) == (1, 1):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as info:
        fit(_cfg(shapes_dir, tmp_path, name="cut", workers=workers, freeze_early=freeze), on_step=ctrl_c, log=lambda *_: None)
    assert signal.getsignal(signal.SIGINT) is handler_before  # restored after an interrupted run too
    exc = info.value
    assert exc.exit_code == 130 and exc.signum == signal.SIGINT
    msg = str(exc)
    assert "\n" not in msg and "SIGINT" in msg and "epoch 2, step 2" in msg
    assert f"cnnkit train classify --resume {exc.checkpoint}" in msg
    saved = ck.load_checkpoint(exc.checkpoint)
    assert (saved["epoch"], saved["step"]) == (0, 2)  # epoch 1 finished, 2 steps of epoch 2 done
    assert cut == full[: len(cut)] and len(cut) == 4 + 2

    resumed: list[tuple] = []
    res = fit(_cfg(shapes_dir, tmp_path, freeze_early=freeze), resume=str(exc.checkpoint),
              on_step=lambda e, s, l: resumed.append((e, s, l)), log=lambda *_: None)
    assert resumed == full[len(cut):]  # the same step indices and bitwise the same losses
    _assert_same_weights(res.run_dir / "weights" / "last.pt", res_full.run_dir / "weights" / "last.pt")
    a, b = ck.load_checkpoint(res.run_dir / "weights" / "last.pt"), ck.load_checkpoint(res_full.run_dir / "weights" / "last.pt")
    assert all(torch.equal(a["train_state_dict"][k], b["train_state_dict"][k]) for k in a["train_state_dict"])
    assert _rows(res.run_dir) == _rows(res_full.run_dir)  # the interrupted epoch's mean loss as well


def test_sigterm_then_sigint_on_the_command_line(shapes_dir, tmp_path):
    """The CLI: SIGTERM exits 143, SIGINT 130, each after one line naming the checkpoint and the --resume
    command; the files stay whole and the run then finishes."""
    project = tmp_path / "runs"
    run = project / "classify" / "sig"
    last = run / "weights" / "last.pt"
    for signum, code, args in ((signal.SIGTERM, 143, _argv(shapes_dir, project, "sig", epochs=3)),
                               (signal.SIGINT, 130, _argv(shapes_dir, project, "sig", epochs=3) + ["--resume", str(last)])):
        proc = _start(args)
        assert _wait_for_training(proc)
        if signum == signal.SIGTERM:
            time.sleep(0.3)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == code, (out, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1, err
        assert lines[0].startswith(f"cnnkit: stopped by {signal.Signals(signum).name} at ")
        head, _, path = lines[0].partition("continue with: cnnkit train classify --resume ")
        assert "checkpoint saved in" in head and Path(path).resolve() == last.resolve()
        assert "Traceback" not in err
        _check_every_file(run, epochs=3)
    proc = _start(_argv(shapes_dir, project, "sig", epochs=3) + ["--resume", str(last)])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    rows = _rows(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


_KILL_BETWEEN_WRITES = """
import os, signal, sys
from cnnkit.engine import checkpoint as ck
from cnnkit.cli import main

target = int(sys.argv[1])
save = ck.save_checkpoint

def save_then_die(path, state):
    save(path, state)
    if state.get("epoch") == target and not state.get("step"):
        os.kill(os.getpid(), signal.SIGKILL)  # after the first of the epoch's two checkpoint writes

ck.save_checkpoint = save_then_die
sys.exit(main(sys.argv[2:]))
"""


def test_kill_between_the_best_and_last_writes_loses_nothing(shapes_dir, tmp_path):
    """An epoch that improves the fitness writes two checkpoints; SIGKILL right after the first of them.
    The resumed run must end with the uninterrupted run's best.pt and last.pt (a last.pt written first
    would already count that epoch as saved, and its best.pt would be lost for good)."""
    project = tmp_path / "runs"
    # a model that learns here: the fitness improves at most epochs (each improvement writes best.pt)
    faster = ["--width", "0.25", "--lr", "0.05", "--warmup-epochs", "0"]
    ref = _start(_argv(shapes_dir, project, "reference", epochs=6) + faster)
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    ref_run = project / "classify" / "reference"
    best_epoch = ck.load_checkpoint(ref_run / "weights" / "best.pt")["epoch"]
    assert best_epoch >= 1, "the reference run must improve after its first epoch for this test to mean anything"

    run = project / "classify" / "killed"
    argv = _argv(shapes_dir, project, "killed", epochs=6) + faster
    proc = subprocess.run([sys.executable, "-c", _KILL_BETWEEN_WRITES, str(best_epoch), *argv], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    _check_every_file(run, epochs=6)
    last = run / "weights" / "last.pt"
    assert ck.load_checkpoint(last)["epoch"] == best_epoch - 1  # the killed epoch is not recorded as saved
    resumed = _start(argv + ["--resume", str(last)])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    _assert_same_weights(run / "weights" / "best.pt", ref_run / "weights" / "best.pt")
    _assert_same_weights(run / "weights" / "last.pt", ref_run / "weights" / "last.pt")
    assert ck.load_checkpoint(run / "weights" / "best.pt")["epoch"] == best_epoch
    assert _rows(run) == _rows(ref_run)
