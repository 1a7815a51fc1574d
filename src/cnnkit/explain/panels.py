"""What `cnnkit explain` shows: panels of small numeric grids, formulas spelled out, and their text form.

A `Panel` is one labelled 2D grid (an input, a kernel, an output) with some cells highlighted (the
window being summed, the maximum a pool keeps) and some dimmed (zero padding, rows a transposed
convolution crops). An `Explanation` is rows of panels plus the lines that spell out one sum; the
same object is printed in the terminal (`Explanation.text`) and drawn as a PNG (`cnnkit.explain.draw`).

In the text form a highlighted cell reads `[7]` and a dimmed cell `(0)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Panel:
    """One labelled grid. `highlight` and `dim` are boolean masks of the grid's shape (or None)."""

    title: str
    values: torch.Tensor
    highlight: torch.Tensor | None = None
    dim: torch.Tensor | None = None
    note: str = ""
    decimals: int | None = None  # None: 0 when every value is an integer, else 2

    def __post_init__(self):
        self.values = self.values.detach().to("cpu", torch.float64)
        if self.values.ndim != 2:
            raise ValueError(f"a panel holds a 2D grid, got shape {tuple(self.values.shape)}")
        for name in ("highlight", "dim"):
            mask = getattr(self, name)
            if mask is not None:
                setattr(self, name, mask.detach().to("cpu", torch.bool).reshape(self.values.shape))
        if self.decimals is None:
            self.decimals = decimals_for(self.values)

    def cell_text(self, r: int, c: int) -> str:
        """The number in cell (r, c), as printed and drawn."""
        return format_number(float(self.values[r, c]), self.decimals)

    def is_highlighted(self, r: int, c: int) -> bool:
        return bool(self.highlight is not None and self.highlight[r, c])

    def is_dim(self, r: int, c: int) -> bool:
        return bool(self.dim is not None and self.dim[r, c])

    def text_lines(self) -> list[str]:
        """Title, the grid (`[v]` highlighted, `(v)` dimmed), then the note if there is one."""
        rows, cols = self.values.shape
        cells = [[self.cell_text(r, c) for c in range(cols)] for r in range(rows)]
        width = max(len(t) for row in cells for t in row)
        lines = [self.title]
        for r in range(rows):
            parts = []
            for c in range(cols):
                left, right = ("[", "]") if self.is_highlighted(r, c) else \
                    ("(", ")") if self.is_dim(r, c) else (" ", " ")
                parts.append(f"{left}{cells[r][c].rjust(width)}{right}")
            lines.append("".join(parts).rstrip())
        if self.note:
            lines.append(self.note)
        return lines


@dataclass
class Explanation:
    """A figure: rows of panels, the spelled-out formulas, and the numbers behind them (`data`)."""

    topic: str
    title: str
    rows: list[list[Panel]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    table: str = ""  # a text table printed before the lines (receptive-field)
    png: Path | None = None

    @property
    def panels(self) -> list[Panel]:
        return [p for row in self.rows for p in row]

    def text(self) -> str:
        """The terminal rendering: the title, each row of panels side by side, the table, the lines."""
        out = [self.title, "=" * len(self.title)]
        for row in self.rows:
            out += [""] + side_by_side([p.text_lines() for p in row])
        if self.table:
            out += ["", self.table]
        if self.lines:
            out += [""] + self.lines
        return "\n".join(out)


def decimals_for(values: torch.Tensor) -> int:
    """0 when every value is an integer (what the chapter's small examples use), else 2."""
    finite = values[torch.isfinite(values)]
    return 0 if bool((finite == finite.round()).all()) else 2


def format_number(v: float, decimals: int = 0) -> str:
    """`v` with `decimals` places, no "-0"; infinities as "-inf" / "inf"."""
    if v != v or v in (float("inf"), float("-inf")):
        return str(v)
    text = f"{v:.{decimals}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def side_by_side(blocks: list[list[str]], gap: int = 4) -> list[str]:
    """Text blocks placed next to each other, top-aligned, `gap` spaces apart."""
    widths = [max((len(line) for line in b), default=0) for b in blocks]
    height = max((len(b) for b in blocks), default=0)
    lines = []
    for i in range(height):
        parts = [(b[i] if i < len(b) else "").ljust(w) for b, w in zip(blocks, widths)]
        lines.append((" " * gap).join(parts).rstrip())
    return lines


def term(weight: float, value: float, decimals: int = 0) -> str:
    """One product of a spelled-out sum: `2*3`, `(-1)*3`."""
    w = format_number(weight, decimals)
    x = format_number(value, decimals)
    return f"{'(' + w + ')' if w.startswith('-') else w}*{'(' + x + ')' if x.startswith('-') else x}"


def box_mask(shape: tuple[int, int], top: int, left: int, height: int, width: int) -> torch.Tensor:
    """A boolean mask of `shape` that is True inside the given rectangle (clipped to the grid)."""
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[max(top, 0):max(top + height, 0), max(left, 0):max(left + width, 0)] = True
    return mask
