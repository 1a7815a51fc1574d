"""Memory layout and precision chosen by measurement, once per machine, model and shape.

Which layout (NCHW or channels_last) and which precision (fp32 or bf16 autocast) is fastest on a CPU
depends on the CPU, not on a rule: on an AMD EPYC with AVX-512 BF16, bf16 convolutions run about 2x fp32
and channels_last pays with them; on a CPU with AVX2 only there is no fast bf16, and channels_last still
trains the YOLO default 1.7x faster in fp32 while a small VGG at 32 px is the same either way
(BENCHMARKS.md). So `--precision auto` and `--channels-last auto` time the run's own model at the run's
batch and input size: a warm-up step per candidate, then `TIMED_STEPS` rounds in which the candidates
take turns (forward + backward for training, forward only for inference); each candidate's fastest
step counts. The answer is kept in a small JSON file under
the cache folder ($CNNKIT_CACHE, else $XDG_CACHE_HOME/cnnkit or ~/.cache/cnnkit), keyed by the CPU
(model name, flags, the ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA overrides), torch version, thread
count, model and shape, so later runs pay nothing.

bf16 must beat fp32 by `BF16_MARGIN` to be chosen (it rounds more), channels_last NCHW by
`LAYOUT_MARGIN`. Steps of one candidate that differ by more than `NOISY` times mean another process
took the cores meanwhile: that choice serves the run but is not cached. A candidate that fails (an operator without a kernel for that layout or dtype) is
dropped with one line of log. On CUDA the rules hold everywhere (bf16, or fp16 with a scaler, and
channels_last for tensor cores), so nothing is timed there.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from cnnkit.engine.device import Precision, cpu_supports_bf16, fp32_depthwise, resolve_precision

BF16_MARGIN = 1.10
LAYOUT_MARGIN = 1.05
TIMED_STEPS = 3
NOISY = 1.5  # a candidate whose timed steps differ by more than this factor: measured on a busy machine
CACHE_VERSION = 1


@dataclass(frozen=True)
class Choice:
    """What a run computes with, and the measurement behind it (for the run's header line)."""

    precision: Precision
    channels_last: bool
    times: dict[str, float] = field(default_factory=dict)  # seconds a step, by candidate ("fp32/nchw", ...)
    how: str = "forced"  # "forced", "rule", "measured" or "cached"
    failed: tuple[str, ...] = ()

    def describe(self) -> str:
        """e.g. 'precision fp32, channels_last on (measured; speed against fp32/cl: fp32/nchw 0.58x)'."""
        text = f"precision {self.precision.name}, channels_last {'on' if self.channels_last else 'off'}"
        mine = _label(self.precision.name, self.channels_last)
        if len(self.times) > 1 and mine in self.times:
            others = [f"{k} {self.times[mine] / self.times[k]:.2f}x" for k in self.times if k != mine]
            text += f" ({self.how}; speed against {mine}: " + ", ".join(others) + ")"
        elif self.how != "forced":
            text += f" ({self.how})"
        return text


def _label(precision: str, channels_last: bool) -> str:
    return f"{precision}/{'cl' if channels_last else 'nchw'}"


def cache_dir() -> Path:
    if os.environ.get("CNNKIT_CACHE"):
        return Path(os.environ["CNNKIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))) / "cnnkit"


def cpu_identity() -> str:
    """The CPU model name and the flags that decide the fast kernels, plus torch's own overrides."""
    name, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        import platform

        name = platform.processor() or platform.machine()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "fma")
    env = ",".join(f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ)
    return f"{name} [{' '.join(f for f in wanted if f in flags)}] {env}".strip()


def _cache_key(kind: str, model_id: str, shape: tuple, candidates: list[str]) -> str:
    text = "|".join([str(CACHE_VERSION), kind, cpu_identity(), torch.__version__, str(torch.get_num_threads()),
                     model_id, "x".join(map(str, shape)), ",".join(candidates)])
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def _read_cache() -> dict:
    try:
        return json.loads((cache_dir() / "probe.json").read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, value: dict) -> None:
    from cnnkit.engine.checkpoint import atomic_write_text

    entries = _read_cache()
    entries[key] = value
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_dir() / "probe.json", json.dumps(entries, indent=1, sort_keys=True))
    except OSError:  # a read-only home: measure again next time
        pass


def candidates(precision: str, channels_last: str | bool, device: torch.device) -> tuple[list[str], list[bool]]:
    """The precisions and layouts a run may use, given its settings ("auto" leaves each open)."""
    if precision in (None, "", "auto"):
        precs = ["fp32", "bf16"] if device.type == "cpu" and cpu_supports_bf16() else ["fp32"]
    else:
        precs = [precision]
    layouts = [False, True] if channels_last == "auto" else [_forced_layout(channels_last)]
    return precs, layouts


def _forced_layout(setting: str | bool) -> bool:
    return setting if isinstance(setting, bool) else str(setting).lower() in ("1", "true", "yes", "on")


def _chosen(label: str, device: torch.device, times: dict, how: str, failed=()) -> Choice:
    """The Choice of a candidate label such as "bf16/cl"."""
    p, c = label.split("/")
    return Choice(resolve_precision(p, device), c == "cl", dict(times), how, tuple(failed))


@dataclass(frozen=True)
class ProbeRequest:
    """What a probe decides for: the device, the run's --precision / --channels-last settings ("auto" leaves
    each open), the model's identity and the input shape (batch, C, H, W) that key the cache, and
    whether it times training steps ("train") or forward passes ("infer")."""

    device: torch.device
    precision: str
    channels_last: str | bool
    model_id: str
    shape: tuple
    kind: str = "train"


def choose(model: nn.Module, request: ProbeRequest, *, step: Callable[[nn.Module, Precision, bool], None] | None,
           log=print) -> Choice:
    """Decide precision and layout for `model` (not modified) on `request.device`.

    `step(model_copy, precision, channels_last)` runs one step (a training forward + backward, or an
    inference forward) on a copy of the model already placed in that layout and precision; it is
    called once to warm up and `TIMED_STEPS` times per candidate. `model_id` and `shape` (batch and
    input size) key the cache; `kind` is "train" or "infer". Forced settings are not timed. Random
    number state is restored afterwards, so a run trains the same whether or not it measured."""
    device, precision, channels_last = request.device, request.precision, request.channels_last
    model_id, shape, kind = request.model_id, request.shape, request.kind
    if device.type != "cpu":
        prec = resolve_precision(precision, device)
        cl = True if channels_last == "auto" else _forced_layout(channels_last)
        return Choice(prec, cl, how="rule" if "auto" in (precision, channels_last) else "forced")
    precs, layouts = candidates(precision, channels_last, device)
    labels = [_label(p, c) for p in precs for c in layouts]
    if len(labels) == 1 or step is None:
        how = "forced" if len(labels) == 1 else "rule"
        return Choice(resolve_precision(precs[-1], device), layouts[0], how=how)
    key = _cache_key(kind, model_id, shape, labels)
    hit = _read_cache().get(key)
    if hit and hit.get("choice") in labels:
        return _chosen(hit["choice"], device, hit.get("times", {}), "cached")
    times, failed = _measure(model, device, precs, layouts, step, log)
    noisy = bool(times.pop("noisy", None))
    if not times:  # nothing ran: the plain settings, and the run's own error will say why
        return Choice(resolve_precision("fp32", device), False, how="rule", failed=tuple(failed))
    best = _pick(times)
    if noisy:
        log("probe: the timed steps varied by more than "
            f"{NOISY:g}x (a busy machine?); the choice is used for this run only, not cached")
        return _chosen(best, device, times, "measured, noisy", failed)
    _write_cache(key, {"choice": best, "times": times, "cpu": cpu_identity(), "model": model_id,
                       "shape": list(shape), "kind": kind, "torch": torch.__version__,
                       "threads": torch.get_num_threads()})
    return _chosen(best, device, times, "measured", failed)


def _pick(times: dict[str, float]) -> str:
    """The fastest candidate, preferring fp32 unless bf16 wins by BF16_MARGIN and NCHW unless
    channels_last wins by LAYOUT_MARGIN."""
    def best_layout(prec: str) -> str | None:
        nchw, cl = times.get(f"{prec}/nchw"), times.get(f"{prec}/cl")
        if nchw is None and cl is None:
            return None
        if nchw is None or (cl is not None and nchw / cl >= LAYOUT_MARGIN):
            return f"{prec}/cl"
        return f"{prec}/nchw"

    fp32, bf16 = best_layout("fp32"), best_layout("bf16")
    if bf16 is None:
        return fp32
    if fp32 is None or times[fp32] / times[bf16] >= BF16_MARGIN:
        return bf16
    return fp32


def _measure(model, device, precs, layouts, step, log) -> tuple[dict[str, float], list[str]]:
    """Each candidate warms up once, then the candidates take turns, step by step, `TIMED_STEPS` rounds:
    a burst of load from another process then slows every candidate alike, not just one of them."""
    from cnnkit.engine.checkpoint import rng_state, set_rng_state

    state = rng_state()
    copies: dict[str, tuple] = {}
    times: dict[str, float] = {}
    failed: list[str] = []
    try:
        for p in precs:
            prec = resolve_precision(p, device)
            for cl in layouts:
                label = _label(p, cl)
                try:
                    m = _placed_copy(model, device, prec, cl)
                    step(m, prec, cl)  # warm-up: oneDNN builds its kernels for the shape here
                    copies[label] = (m, prec, cl)
                except Exception as exc:  # noqa: BLE001 - any kernel error: drop the candidate, say so
                    failed.append(label)
                    log(f"probe: {label} does not run here ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                        "left out")
        runs: dict[str, list[float]] = {label: [] for label in copies}
        for _ in range(TIMED_STEPS):
            for label, (m, prec, cl) in copies.items():
                t0 = time.perf_counter()
                step(m, prec, cl)
                runs[label].append(time.perf_counter() - t0)
        times = {label: max(1e-9, min(r)) for label, r in runs.items()}
        if any(max(r) > NOISY * min(r) for r in runs.values()):
            times["noisy"] = 1.0  # the caller does not cache a measurement taken on a busy machine
    finally:
        set_rng_state(state)
    return times, failed


def _placed_copy(model: nn.Module, device: torch.device, precision: Precision, channels_last: bool) -> nn.Module:
    m = copy.deepcopy(model)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    fp32_depthwise(m, device, precision)
    return m


def model_id(model: nn.Module, extra: str = "") -> str:
    """The model's registry name and options, and which of its parameters train (frozen layers skip
    their backward pass)."""
    name = getattr(model, "cnnkit_name", type(model).__name__)
    kwargs = json.dumps(getattr(model, "cnnkit_kwargs", {}), sort_keys=True, default=str)
    trainable = sum(p.requires_grad for p in model.parameters())
    return f"{name}{kwargs}/trainable={trainable}{'/' + extra if extra else ''}"
