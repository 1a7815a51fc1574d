"""`--precision auto` / `--channels-last auto`: chosen by timing the run's own model, cached per CPU, torch,
model and shape; forced settings are not timed; a candidate that fails is left out with one line; the
random state is the same after a measurement; bf16 is no candidate where oneDNN has no bf16 (the AVX2
stand-in ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from cnnkit.engine import probe
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.probe import ProbeRequest, Choice, _pick, choose

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "probe.json"


def _model():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())


@pytest.fixture
def virtual_clock(monkeypatch):
    """The probe reads a virtual clock that only the test's steps advance: timings are exact."""
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(probe, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    return clock


def _sleeper(seconds_by_layout: dict[bool, float], calls: list, clock):
    """A step that takes a known time per layout (the kernels' speed, made deterministic)."""
    def step(m, precision, channels_last):
        calls.append((precision.name, channels_last))
        assert next(m.parameters()).is_contiguous(memory_format=torch.channels_last) == channels_last
        clock.now += seconds_by_layout[channels_last]
    return step


def test_pick_prefers_fp32_and_nchw_unless_clearly_faster():
    assert _pick({"fp32/nchw": 1.0, "fp32/cl": 0.97}) == "fp32/nchw"  # 1.03x: within LAYOUT_MARGIN
    assert _pick({"fp32/nchw": 1.0, "fp32/cl": 0.6}) == "fp32/cl"
    assert _pick({"fp32/nchw": 1.0, "fp32/cl": 1.1, "bf16/nchw": 0.95, "bf16/cl": 0.93}) == "fp32/nchw"  # 1.07x
    assert _pick({"fp32/nchw": 1.0, "fp32/cl": 1.1, "bf16/nchw": 0.6, "bf16/cl": 0.5}) == "bf16/cl"
    assert _pick({"fp32/nchw": 1.0}) == "fp32/nchw"


def test_layout_is_measured_then_cached(cache, virtual_clock):
    calls: list = []
    step = _sleeper({False: 0.03, True: 0.01}, calls, virtual_clock)
    logs: list[str] = []
    c = choose(_model(), ProbeRequest(CPU, "fp32", "auto", "m", (2, 3, 8, 8)),
               step=step, log=logs.append)
    assert (c.precision.name, c.channels_last, c.how) == ("fp32", True, "measured")
    assert len(calls) == 2 * (1 + probe.TIMED_STEPS) and not logs
    assert c.times["fp32/nchw"] / c.times["fp32/cl"] > 2
    assert "channels_last on (measured; speed against fp32/cl: fp32/nchw 0.3" in c.describe()
    entry = next(iter(json.loads(cache.read_text()).values()))
    assert entry["choice"] == "fp32/cl" and entry["shape"] == [2, 3, 8, 8] and entry["cpu"] == probe.cpu_identity()

    def never(*a):
        raise AssertionError("a cached answer measures nothing")

    again = choose(_model(), ProbeRequest(CPU, "fp32", "auto", "m", (2, 3, 8, 8)),
                   step=never)
    assert (again.channels_last, again.how) == (True, "cached")
    other = choose(_model(), ProbeRequest(CPU, "fp32", "auto", "m", (4, 3, 8, 8)),
                   step=_sleeper({False: 0.01, True: 0.02}, [], virtual_clock))
    assert (other.channels_last, other.how) == (False, "measured")  # another batch size is measured anew


def test_a_busy_machine_is_not_cached(cache, virtual_clock):
    """One timed step of a candidate twice as slow as its others: the choice serves this run only."""
    slow = iter([0.01, 0.01, 0.03, 0.01, 0.01, 0.01, 0.01, 0.01])  # warm-ups, then rounds nchw/cl

    def step(m, precision, channels_last):
        virtual_clock.now += next(slow)

    logs: list[str] = []
    c = choose(_model(), ProbeRequest(CPU, "fp32", "auto", "m", (1, 3, 8, 8)),
               step=step, log=logs.append)
    assert c.how == "measured, noisy" and not cache.exists()
    assert len(logs) == 1 and "not cached" in logs[0]


def test_forced_settings_are_not_timed(cache):
    def never(*a):
        raise AssertionError("forced: nothing to measure")

    c = choose(_model(), ProbeRequest(CPU, "fp32", "on", "m", (1, 3, 8, 8)), step=never)
    assert (c.precision.name, c.channels_last, c.how) == ("fp32", True, "forced")
    assert not cache.exists()


def test_a_layout_that_fails_is_left_out_with_one_line(cache, virtual_clock):
    def step(m, precision, channels_last):
        if channels_last:
            raise RuntimeError("no channels_last kernel for this operator\nsecond line")

    logs: list[str] = []
    c = choose(_model(), ProbeRequest(CPU, "fp32", "auto", "m", (1, 3, 8, 8)),
               step=step, log=logs.append)
    assert (c.channels_last, c.failed) == (False, ("fp32/cl",))
    assert len(logs) == 1 and "fp32/cl does not run here (RuntimeError: no channels_last kernel" in logs[0]
    assert "second line" not in logs[0]


def test_the_random_state_is_restored(cache, virtual_clock):
    def step(m, precision, channels_last):
        torch.rand(100)

    model = _model()
    torch.manual_seed(5)
    choose(model, ProbeRequest(CPU, "fp32", "auto", "m", (1, 3, 8, 8)), step=step)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after)


def test_the_model_is_not_touched(cache, virtual_clock):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def step(m, precision, channels_last):
        m.train()
        m(torch.randn(2, 3, 8, 8)).sum().backward()

    choose(model, ProbeRequest(CPU, "fp32", "auto", "bn", (2, 3, 8, 8)), step=step)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics too
    assert model[0].weight.is_contiguous()


def test_the_cache_key_names_the_cpu_override(monkeypatch):
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    plain = probe.cpu_identity()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert probe.cpu_identity() != plain and "ATEN_CPU_CAPABILITY=avx2" in probe.cpu_identity()


def test_bf16_is_no_candidate_under_the_avx2_stand_in():
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", PYTHONPATH=str(REPO / "src"))
    code = ("import torch; from cnnkit.engine.probe import candidates; "
            "print(candidates('auto', 'auto', torch.device('cpu'))[0])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['fp32']"


def test_fit_measures_once_and_says_so(shapes_dir, tmp_path, cache, one_thread, monkeypatch):
    from cnnkit.engine.trainer import fit

    monkeypatch.setattr(probe, "NOISY", float("inf"))  # real timings: cached even when this machine is busy
    cfg = dict(task="classify", model="vgg11_bn", model_kwargs={"width": 0.125, "pool_size": 1}, data=str(shapes_dir),
               epochs=1, batch_size=16, img_size=32, workers=0, project=str(tmp_path / "runs"), plots=False,
               progress=False)
    first: list[str] = []
    fit(TrainConfig(**cfg, name="a"), log=first.append)
    header = next(ln for ln in first if "device cpu" in ln)
    assert "(measured; speed against " in header and "nchw" in header and "/cl" in header
    second: list[str] = []
    fit(TrainConfig(**cfg, name="b"), log=second.append)
    assert "(cached; speed against " in next(ln for ln in second if "device cpu" in ln)
    forced: list[str] = []
    fit(TrainConfig(**cfg, name="c", precision="fp32", channels_last="off"), log=forced.append)
    assert "precision fp32, channels_last off," in next(ln for ln in forced if "device cpu" in ln)


def test_inference_settings_are_measured_too(shapes_dir, tmp_path, cache, one_thread, monkeypatch):
    from cnnkit.engine.inference import load_trained
    from cnnkit.engine.trainer import fit

    monkeypatch.setattr(probe, "NOISY", float("inf"))
    res = fit(TrainConfig(task="classify", model="vgg11_bn", model_kwargs={"width": 0.125, "pool_size": 1},
                          data=str(shapes_dir), epochs=1, batch_size=16, img_size=32, workers=0, precision="fp32",
                          channels_last="off", project=str(tmp_path / "runs"), plots=False, progress=False),
              log=lambda *_: None)
    logs: list[str] = []
    t = load_trained(res.run_dir / "weights" / "best.pt", batch_size=8, log=logs.append)
    assert logs[-1].startswith("inference on cpu: precision ") and "(measured; speed against " in logs[-1]
    assert isinstance(t.channels_last, bool)
    t = load_trained(res.run_dir / "weights" / "best.pt", precision="fp32", channels_last="on", log=logs.append)
    assert (t.precision.name, t.channels_last) == ("fp32", True)
    assert logs[-1] == ("inference on cpu: precision fp32, channels_last on; "
                        "BatchNorm folded into the convolution before it: 8 of 8 layers")  # vgg11_bn: 8 conv + BN


def test_choice_describes_a_rule():
    from cnnkit.engine.device import resolve_precision

    assert Choice(resolve_precision("fp32", CPU), False, how="rule").describe() == \
        "precision fp32, channels_last off (rule)"
