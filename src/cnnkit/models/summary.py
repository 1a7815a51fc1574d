"""Layer-by-layer summary of a model: output shapes, parameters, multiply-adds, receptive fields.

`summarize` runs one forward pass (batch 1, on meta tensors when the model allows it, so even VGG-19
costs no arithmetic) with a forward hook on every leaf module and records, per call:

- the output shape and the parameters the layer owns;
- its multiply-accumulates (MACs), counted for the layers that do the arithmetic, the convention of
  the "GFLOPS" figures torchvision and the papers quote:
      convolution             out_elements * (C_in / groups) * kH * kW
      transposed convolution  in_elements * (C_out / groups) * kH * kW
      fully connected         out_elements * in_features
  (bias additions, normalisation, activations and pooling are not multiply-adds and count 0);
- after each sliding-window layer (convolution, max/mean pooling), the receptive field and the total
  stride along the chain of layers so far, from `cnnkit.ops.sizes.receptive_fields`:
      r_l = r_{l-1} + (k_l - 1) d_l j_{l-1},   j_l = j_{l-1} s_l.
  The chain is the order the layers run in, which is exact for plain stacks such as AlexNet and
  VGG. A layer whose window is not fixed (adaptive pooling, upsampling, flatten, a fully connected
  layer) ends the chain: later rows show no receptive field.

`format_summary` prints the table and the totals; `model_info(name)` does both for a registered model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
from torch.func import functional_call

from cnnkit.errors import CnnkitError, ModelError, ShapeError
from cnnkit.models.registry import build_model
from cnnkit.ops.sizes import LayerGeometry, conv_output_size, receptive_fields

# Layers that act on each pixel (or each channel) on its own: they leave the receptive field as is.
_POINTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
              nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Identity,
              nn.Dropout, nn.Dropout2d, nn.modules.batchnorm._BatchNorm, nn.LocalResponseNorm)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


# --- geometry of sliding-window layers ---------------------------------------------------------

@dataclass(frozen=True)
class WindowGeometry:
    """A 2D sliding-window layer's geometry along each axis, plus how it rounds its output size."""

    height: LayerGeometry
    width: LayerGeometry
    ceil_mode: bool = False
    same_padding: bool = False  # padding="same": the output keeps the input size


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def window_geometry(module: nn.Module) -> WindowGeometry | None:
    """The geometry of a Conv2d, MaxPool2d or AvgPool2d; None for any other layer."""
    if isinstance(module, nn.Conv2d):
        k, s, d = _pair(module.kernel_size), _pair(module.stride), _pair(module.dilation)
        same = module.padding == "same"
        if isinstance(module.padding, str):  # "valid" pads nothing; "same" pads d(k-1) in total
            p = tuple(d[i] * (k[i] - 1) // 2 if same else 0 for i in range(2))
        else:
            p = _pair(module.padding)
        ceil = False
    elif isinstance(module, nn.MaxPool2d):
        k, s, p = _pair(module.kernel_size), _pair(module.stride), _pair(module.padding)
        d, ceil, same = _pair(module.dilation), bool(module.ceil_mode), False
    elif isinstance(module, nn.AvgPool2d):
        k, s, p = _pair(module.kernel_size), _pair(module.stride), _pair(module.padding)
        d, ceil, same = (1, 1), bool(module.ceil_mode), False
    else:
        return None
    return WindowGeometry(LayerGeometry(k[0], s[0], d[0], p[0]), LayerGeometry(k[1], s[1], d[1], p[1]),
                          ceil, same)


def _output_length(size: int, g: LayerGeometry, w: WindowGeometry) -> int:
    if w.same_padding:
        return size
    return conv_output_size(size, g.kernel_size, g.stride, g.padding, g.dilation, w.ceil_mode)


def smallest_input_size(layers: nn.Module | Iterable[nn.Module], limit: int = 10_000) -> int:
    """The smallest H = W that a stack of layers accepts (every window fits its padded input).

    The sliding-window layers are taken in registration order, which is the call order of an
    `nn.Sequential`. Example: AlexNet's features need 63 pixels (11x11 stride-4 convolution, then
    three 3x3 stride-2 max pools), VGG's need 32 (five 2x2 stride-2 max pools).
    """
    modules = layers.modules() if isinstance(layers, nn.Module) else layers
    windows = [w for w in map(window_geometry, modules) if w is not None]
    smallest = 1
    for axis in ("height", "width"):
        for n in range(1, limit + 1):
            try:
                size = n
                for w in windows:
                    size = _output_length(size, getattr(w, axis), w)
            except ShapeError:
                continue
            smallest = max(smallest, n)
            break
        else:
            raise ModelError(f"these layers accept no input of up to {limit} pixels",
                             fix="check their kernel sizes, strides and padding")
    return smallest


# --- the summary -------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerRow:
    """One call of one leaf module."""

    name: str
    type: str
    output_shape: tuple[int, ...]
    params: int
    macs: int
    receptive_field: tuple[int, int] | None = None  # (height, width), after sliding-window layers
    total_stride: tuple[int, int] | None = None


@dataclass(frozen=True)
class ModelSummary:
    rows: tuple[LayerRow, ...]
    input_shape: tuple[int, ...]  # (C, H, W), without the batch
    total_params: int
    trainable_params: int
    macs: int
    conv_params: int
    fc_params: int
    name: str = ""

    @property
    def conv_share(self) -> float:
        """Fraction of the parameters in convolutional layers."""
        return self.conv_params / self.total_params if self.total_params else 0.0

    @property
    def fc_share(self) -> float:
        """Fraction of the parameters in fully connected layers."""
        return self.fc_params / self.total_params if self.total_params else 0.0


def _macs(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    if isinstance(module, _CONV):
        return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, _CONV_TRANSPOSE):
        return inputs[0].numel() * (module.out_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(value, dict):
        return _first_tensor(list(value.values()))
    return None


def _check_input_shape(input_shape) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(v, int) and v >= 1 for v in shape):
        raise ShapeError(f"input shape must be (channels, height, width) of positive ints, got {shape}")
    return shape  # type: ignore[return-value]


class _Recorder:
    """Forward hooks that turn each leaf-module call into a LayerRow."""

    def __init__(self, model: nn.Module):
        self.names = {m: n for n, m in model.named_modules(remove_duplicate=False)}
        self.rows: list[LayerRow] = []
        self.seen: set[int] = set()
        self.chain: list[WindowGeometry] = []
        self.chain_open = True

    def reset(self) -> None:
        self.rows.clear()
        self.seen.clear()
        self.chain.clear()
        self.chain_open = True

    def hook(self, module: nn.Module, inputs: tuple, output) -> None:
        out = _first_tensor(output)
        params = 0
        if id(module) not in self.seen:  # a layer called twice owns its parameters once
            self.seen.add(id(module))
            params = sum(p.numel() for p in module.parameters(recurse=False))
        rf = stride = None
        geometry = window_geometry(module)
        if geometry is not None and self.chain_open:
            self.chain.append(geometry)
            fh = receptive_fields(w.height for w in self.chain)[-1]
            fw = receptive_fields(w.width for w in self.chain)[-1]
            rf, stride = (fh.receptive_field, fw.receptive_field), (fh.total_stride, fw.total_stride)
        elif geometry is None and not isinstance(module, _POINTWISE):
            self.chain_open = False
        self.rows.append(LayerRow(
            name=self.names.get(module, type(module).__name__) or type(module).__name__,
            type=type(module).__name__,
            output_shape=tuple(out.shape) if out is not None else (),
            params=params,
            macs=_macs(module, inputs, out) if out is not None else 0,
            receptive_field=rf, total_stride=stride))


def summarize(model: nn.Module, input_shape: tuple[int, int, int] = (3, 224, 224)) -> ModelSummary:
    """Run `model` once on a (1, C, H, W) input and summarise it layer by layer.

    The pass runs on meta tensors (shapes only, no arithmetic, the model's own tensors untouched);
    a model that cannot run on meta tensors is run for real on CPU zeros, without gradients. The
    model is put in eval mode for the pass and its modes are restored afterwards. A model that
    cannot take the input (too small, wrong channels) raises `ShapeError`.
    """
    shape = _check_input_shape(input_shape)
    recorder = _Recorder(model)
    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(recorder.hook) for m in leaves]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        try:
            named = [*model.named_parameters(remove_duplicate=False),
                     *model.named_buffers(remove_duplicate=False)]
            state = {n: t.to("meta") for n, t in named}
            with torch.no_grad():
                functional_call(model, state, (torch.zeros((1, *shape), device="meta"),))
        except (NotImplementedError, RuntimeError) as meta_error:
            recorder.reset()
            device = next((t.device for t in model.parameters()), torch.device("cpu"))
            if device.type == "meta":
                raise ShapeError(f"the model cannot run on an input of shape {shape}: "
                                 f"{str(meta_error).splitlines()[0]}") from None
            try:
                with torch.no_grad():
                    model(torch.zeros((1, *shape), device=device))
            except (NotImplementedError, RuntimeError) as exc:
                raise ShapeError(f"the model cannot run on an input of shape {shape}: "
                                 f"{str(exc).splitlines()[0]}") from None
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training

    params = list(model.parameters())
    conv = sum(p.numel() for m in model.modules() if isinstance(m, _CONV + _CONV_TRANSPOSE)
               for p in m.parameters(recurse=False))
    fc = sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear)
             for p in m.parameters(recurse=False))
    return ModelSummary(
        rows=tuple(recorder.rows), input_shape=shape,
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        macs=sum(r.macs for r in recorder.rows), conv_params=conv, fc_params=fc,
        name=str(getattr(model, "cnnkit_name", type(model).__name__)))


# --- text ----------------------------------------------------------------------------------------

def _square(pair: tuple[int, int] | None) -> str:
    if pair is None:
        return ""
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


def _shape(shape: tuple[int, ...]) -> str:
    return " x ".join(str(v) for v in shape[1:]) if shape else "-"


def format_summary(summary: ModelSummary) -> str:
    """An aligned table (one row per layer call), then the totals."""
    header = ("layer", "type", "output (C x H x W)", "params", "MACs", "RF", "stride")
    right = (False, False, True, True, True, True, True)
    table = [header] + [(r.name, r.type, _shape(r.output_shape), f"{r.params:,}" if r.params else "",
                         f"{r.macs:,}" if r.macs else "", _square(r.receptive_field),
                         _square(r.total_stride)) for r in summary.rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]

    def line(row) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip()

    rule = "-" * len(line(tuple("-" * w for w in widths)))
    s = summary
    label = f"{s.name}, input " if s.name else "input "
    out = [f"{label}{' x '.join(map(str, s.input_shape))}", rule, line(header), rule,
           *(line(row) for row in table[1:]), rule]
    totals = [
        ("total parameters", f"{s.total_params:,}"),
        ("trainable parameters", f"{s.trainable_params:,}"),
        ("multiply-adds (MACs)", f"{s.macs:,} ({s.macs / 1e9:.2f} G)"),
        ("in convolutions", f"{s.conv_params:,} parameters ({100 * s.conv_share:.1f}%)"),
        ("in fully connected", f"{s.fc_params:,} parameters ({100 * s.fc_share:.1f}%)"),
    ]
    key = max(len(k) for k, _ in totals)
    out += [f"{k.ljust(key)}  {v}" for k, v in totals]
    return "\n".join(out)


def model_info(name: str, input_shape: tuple[int, int, int] | int | None = None, **model_kwargs) -> str:
    """Build the registered model `name` and return its formatted summary.

    `input_shape` is (C, H, W), or one int for a square image with the model's channels; by default
    (model's in_channels, 224, 224). The model is built on the meta device (no memory, no weight
    initialisation), so even the largest VGG takes no time. An input the model cannot take raises
    `ShapeError`.
    """
    try:
        with torch.device("meta"):
            model = build_model(name, **model_kwargs)
    except CnnkitError:
        raise
    except Exception:  # a builder that cannot run on meta (e.g. one that reads a weights file)
        model = build_model(name, **model_kwargs)
    channels = int(getattr(model, "in_channels", 3))
    if input_shape is None:
        input_shape = (channels, 224, 224)
    elif isinstance(input_shape, int):
        input_shape = (channels, input_shape, input_shape)
    shape = _check_input_shape(input_shape)
    smallest = getattr(model, "min_input_size", None)
    if smallest is not None and min(shape[1:]) < smallest:
        raise ShapeError(f"{name} needs inputs of at least {smallest}x{smallest} pixels, "
                         f"got {shape[1]}x{shape[2]}", fix=f"use an image size of {smallest} or more")
    return format_summary(summarize(model, shape))
