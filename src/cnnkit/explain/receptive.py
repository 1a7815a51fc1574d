"""Receptive field and total stride ("jump") of a registered model, layer by layer.

The per-layer numbers come from `cnnkit.models.summary.summarize` (the table `cnnkit info` prints),
which follows the chain of sliding-window layers with `cnnkit.ops.sizes.receptive_fields`:

    r_l = r_{l-1} + (k_l - 1) d_l j_{l-1},     j_l = j_{l-1} s_l,     r_0 = 1, j_0 = 1

The picture places one output unit's field on the input: the centre of unit u of layer l lies at
start_l + u * j_l in input pixel coordinates (`FieldOfView.start`, pixel p covering [p, p + 1)), and
its field spans r_l pixels around that centre; the part outside the image falls in the padding.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cnnkit.errors import CnnkitError, ShapeError, UsageError
from cnnkit.explain.panels import Explanation
from cnnkit.models.summary import _POINTWISE, LayerRow, summarize, window_geometry
from cnnkit.ops.sizes import receptive_fields


def _build(name: str) -> nn.Module:
    """The registered model on the meta device (no memory, no initialisation) when it allows it."""
    from cnnkit.models.registry import build_model

    try:
        with torch.device("meta"):
            return build_model(name)
    except CnnkitError:
        raise
    except Exception:  # a builder that cannot run on meta
        return build_model(name)


def _shape(row: LayerRow) -> str:
    return " x ".join(str(v) for v in row.output_shape[1:])


def _square(pair) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


def explain_receptive_field(model: str | nn.Module, *, input_size: int | None = None,
                            layer: str | None = None) -> Explanation:
    """Table of output size, total stride and receptive field per sliding-window layer of `model`
    (a registry name or a module), and the field of the centre unit of `layer` (default: the last
    layer with a fixed receptive field) on the input grid.

    input_size: the square input side (default: the model's `img_size`, else 224).
    """
    net = _build(model) if isinstance(model, str) else model
    name = model if isinstance(model, str) else str(getattr(model, "cnnkit_name", type(model).__name__))
    channels = int(getattr(net, "in_channels", 3))
    size = int(input_size if input_size is not None else getattr(net, "img_size", 224))
    smallest = getattr(net, "min_input_size", None)
    if size < 1 or (smallest is not None and size < smallest):
        raise ShapeError(f"{name} needs inputs of at least {smallest or 1}x{smallest or 1} pixels, got {size}",
                         fix=f"use an input size of {smallest or 1} or more")
    summary = summarize(net, (channels, size, size))
    chain = [r for r in summary.rows if r.receptive_field is not None]
    if not chain:
        raise UsageError(f"{name} has no convolution or pooling layer with a fixed window",
                         fix="pick a convolutional model, see `cnnkit models`")
    if layer is None:
        last = len(chain) - 1
    else:
        matches = [k for k, r in enumerate(chain) if r.name == layer]
        if not matches:
            names = ", ".join(r.name for r in chain[-4:])
            raise UsageError(f"{name} has no sliding-window layer named {layer!r}",
                             fix=f"use a layer from the table, e.g. {names}")
        last = matches[-1]
    chosen = chain[last]

    modules = dict(net.named_modules(remove_duplicate=False))
    geometry = [window_geometry(modules[r.name]) for r in chain[:last + 1]]
    fields = [receptive_fields(g.height for g in geometry), receptive_fields(g.width for g in geometry)]
    fov = [fields[0][-1], fields[1][-1]]
    out_hw = chosen.output_shape[-2:]
    unit = (out_hw[0] // 2, out_hw[1] // 2)
    centre = [fov[a].start + unit[a] * fov[a].total_stride for a in (0, 1)]
    box = [round(centre[a] - fov[a].receptive_field / 2) for a in (0, 1)]  # top, left (may be < 0)

    header = ("layer", "type", "output (C x H x W)", "stride", "RF")
    table = [header] + [(r.name, r.type, _shape(r), _square(r.total_stride), _square(r.receptive_field))
                        for r in chain]
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]

    def line(row, mark=""):
        cells = [v.ljust(w) if c < 2 else v.rjust(w) for c, (v, w) in enumerate(zip(row, widths))]
        return ("  ".join(cells) + mark).rstrip()

    rule = "-" * len(line(tuple("-" * w for w in widths)))
    text = [line(header), rule] + [line(row, "  <-" if k == last else "") for k, row in enumerate(table[1:])]
    rf = fov[0].receptive_field, fov[1].receptive_field
    bottom, right = box[0] + rf[0] - 1, box[1] + rf[1] - 1
    lines = [
        "r_l = r_(l-1) + (k_l - 1) * d_l * j_(l-1),  j_l = j_(l-1) * s_l  (j = total stride)",
        f"unit {unit} of {chosen.name} sees input rows {box[0]}..{bottom} and columns {box[1]}..{right} "
        f"({_square(rf)} pixels, centre ({centre[0]:g}, {centre[1]:g}); beyond 0..{size - 1} is padding); "
        f"neighbouring units are {_square((fov[0].total_stride, fov[1].total_stride))} pixels apart",
    ]
    after = summary.rows[summary.rows.index(chain[-1]) + 1:]
    ends = [r for r in after if not isinstance(modules.get(r.name), _POINTWISE)]
    if ends:
        lines.append(f"from {ends[0].name} ({ends[0].type}) on, a unit no longer has a fixed window "
                     f"(the table stops there)")
    return Explanation(
        "receptive-field", f"receptive field of {name}, input {channels} x {size} x {size}",
        table="\n".join(text), lines=lines,
        data=dict(model=name, input_size=size, rows=chain, chosen=chosen, unit=unit, centre=centre,
                  box=(box[0], box[1], rf[0], rf[1]), fields=fields))
