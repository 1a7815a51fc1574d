"""`cnnkit explain TOPIC`: the chapter's figures, computed with the real operations of `cnnkit.ops`.

Each topic builds an `Explanation` (rows of small integer grids and the sums spelled out for one
output pixel) from random integers (seeded), prints it as text and draws it as a PNG:

    conv              a K x K kernel sliding over an input: one weighted sum spelled out, the output
    pool              subsampling, max pooling and mean pooling of the same input
    upsample          nearest (duplicate), max-unpooling (with a max pool's indices) and bilinear
    conv-transpose    each input pixel stamps the scaled kernel; the stamps add up; padding crops
    conv1x1           C_in channels mixed into C_out by a 1x1 convolution at every pixel
    receptive-field   output size, total stride and receptive field per layer of a registered model

    >>> from cnnkit.explain import explain
    >>> e = explain("conv", kernel=3, stride=2, padding=1, out="runs/explain")
    >>> print(e.text()); e.png
"""

from __future__ import annotations

import re
from pathlib import Path

from cnnkit.errors import UsageError

TOPICS = ("conv", "pool", "upsample", "conv-transpose", "conv1x1", "receptive-field")

# The options each topic takes, with its defaults (None: the topic works it out, see the help text).
TOPIC_OPTIONS: dict[str, dict[str, object]] = {
    "conv": dict(input_size=5, kernel=3, stride=1, padding=0, activation="relu", at=None),
    "pool": dict(input_size=4, kernel=2, stride=None, padding=0, at=None),
    "upsample": dict(input_size=3, stride=2),
    "conv-transpose": dict(input_size=2, kernel=3, stride=2, padding=1, output_padding=0),
    "conv1x1": dict(input_size=3, in_channels=3, out_channels=2, at=None),
    "receptive-field": dict(input_size=None, layer=None),
}

DEFAULT_OUT = "runs/explain"


def topic_defaults(option: str) -> str:
    """'conv 5, pool 4, ...': the default of `option` in every topic that takes it (for --help)."""
    shown = {None: "auto"}
    return ", ".join(f"{t} {shown.get(o[option], o[option])}" for t, o in TOPIC_OPTIONS.items() if option in o)


def option_flag(option: str) -> str:
    """The command-line flag of a library option: input_size -> --input, output_padding -> --output-padding."""
    return "--input" if option == "input_size" else "--" + option.replace("_", "-")


def parse_position(text: str | None) -> tuple[int, int] | None:
    """'1,2' -> (1, 2): the output pixel to spell out; None stays None (the centre)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[, x]\s*(\d+)\s*", text)
    if not m:
        raise UsageError(f"malformed position {text!r}", fix="write it as ROW,COL, e.g. 1,2")
    return int(m.group(1)), int(m.group(2))


def build_explanation(topic: str, model: str | None = None, *, seed: int = 0, **options):
    """The `Explanation` of `topic` (no file written). Options a topic does not take raise UsageError;
    options given as None take the topic's default."""
    if topic not in TOPICS:
        raise UsageError(f"unknown topic {topic!r}", fix=f"use one of {', '.join(TOPICS)}")
    accepted = TOPIC_OPTIONS[topic]
    given = {k: v for k, v in options.items() if v is not None}
    extra = sorted(set(given) - set(accepted))
    if extra:
        raise UsageError(f"{', '.join(map(option_flag, extra))} does not apply to the topic {topic}",
                         fix=f"{topic} takes {', '.join(map(option_flag, accepted))}")
    kwargs = {**accepted, **given}
    if "at" in kwargs and isinstance(kwargs["at"], str):
        kwargs["at"] = parse_position(kwargs["at"])
    if topic == "receptive-field":
        if model is None:
            raise UsageError("receptive-field needs a model name",
                             fix="e.g. `cnnkit explain receptive-field vgg16`; see `cnnkit models`")
        from cnnkit.explain.receptive import explain_receptive_field

        return explain_receptive_field(model, **kwargs)
    if model is not None:
        raise UsageError(f"the topic {topic} takes no model (got {model!r})",
                         fix="give a model only to receptive-field")
    from cnnkit.explain import operations

    builder = {"conv": operations.explain_conv, "pool": operations.explain_pool,
               "upsample": operations.explain_upsample, "conv-transpose": operations.explain_conv_transpose,
               "conv1x1": operations.explain_conv1x1}[topic]
    return builder(seed=seed, **kwargs)


def explain(topic: str, model: str | None = None, *, out: str | Path = DEFAULT_OUT, seed: int = 0,
            **options):
    """Build the explanation of `topic`, draw it to `out`/<topic>.png (receptive-field:
    `out`/receptive-field_<model>.png), and return it; its `.png` is where the picture went and
    `.text()` the terminal rendering."""
    from cnnkit.explain.draw import draw_panels, draw_receptive_field

    expl = build_explanation(topic, model, seed=seed, **options)
    name = topic if topic != "receptive-field" else f"{topic}_{expl.data['model']}"
    path = Path(out) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
    expl.png = draw_receptive_field(expl, path) if topic == "receptive-field" else draw_panels(expl, path)
    return expl
