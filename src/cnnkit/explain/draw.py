"""Drawing an `Explanation` as a PNG (matplotlib's Agg renderer, no pyplot state, atomic write).

Panels are laid out row by row, every grid cell the same size, with its number written in it;
highlighted cells get a thick red frame, dimmed cells (padding, cropped rows) a grey hatch.
"""

from __future__ import annotations

from pathlib import Path

from cnnkit.explain.panels import Explanation, Panel
from cnnkit.utils import atomic_path

CELL = 0.42      # inches per grid cell
GAP = 0.5        # inches between panels
TITLE = 0.45     # inches above each panel for its title
NOTE = 0.3       # inches below a panel for its note
LINE = 0.22      # inches per caption line


def _panel_size(p: Panel) -> tuple[float, float]:
    """The panel's slot: wide enough for its grid, its title and its note (about 0.075 in a character)."""
    rows, cols = p.values.shape
    width = max(cols * CELL, 0.075 * len(p.title), 0.067 * len(p.note))
    return width, rows * CELL + TITLE + (NOTE if p.note else 0.0)


def _draw_panel(fig, p: Panel, left: float, bottom: float, fig_w: float, fig_h: float) -> None:
    from matplotlib.patches import Rectangle

    rows, cols = p.values.shape
    w, h = cols * CELL, rows * CELL
    y0 = bottom + (NOTE if p.note else 0.0)
    ax = fig.add_axes((left / fig_w, y0 / fig_h, w / fig_w, h / fig_h))
    values = p.values.numpy()
    finite = values[abs(values) != float("inf")]
    top = float(abs(finite).max()) if finite.size else 1.0
    top = top or 1.0
    signed = bool((finite < 0).any())
    cmap = "coolwarm" if signed else "Blues"
    ax.imshow(values, cmap=cmap, vmin=-top if signed else 0.0, vmax=top, aspect="equal",
              extent=(0, cols, rows, 0), interpolation="nearest")
    longest = max(len(p.cell_text(r, c)) for r in range(rows) for c in range(cols))
    size = max(6.0, min(11.0, 0.85 * 72 * CELL / (0.6 * longest)))  # a character is ~0.6 em wide
    for r in range(rows):
        for c in range(cols):
            v = float(values[r, c])
            strong = abs(v) > 0.6 * top
            ax.text(c + 0.5, r + 0.5, p.cell_text(r, c), ha="center", va="center", fontsize=size,
                    color="white" if strong else "black", fontweight="bold" if p.is_highlighted(r, c) else None)
            if p.is_dim(r, c):
                ax.add_patch(Rectangle((c, r), 1, 1, facecolor="0.85", alpha=0.6, hatch="///",
                                       edgecolor="0.5", linewidth=0))
            if p.is_highlighted(r, c):
                ax.add_patch(Rectangle((c + 0.06, r + 0.06), 0.88, 0.88, fill=False, edgecolor="red",
                                       linewidth=2))
    ax.set_xticks(range(cols + 1))
    ax.set_yticks(range(rows + 1))
    ax.grid(True, color="0.4", linewidth=0.6)
    ax.tick_params(length=0, labelbottom=False, labelleft=False)
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_title(p.title, fontsize=9)
    if p.note:
        ax.text(0, rows + 0.15, p.note, ha="left", va="top", fontsize=8, color="0.3")


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def draw_panels(expl: Explanation, path: str | Path) -> Path:
    """Every row of panels, then the spelled-out lines, in one PNG at `path` (written atomically)."""
    from matplotlib.figure import Figure

    sizes = [[_panel_size(p) for p in row] for row in expl.rows]
    row_w = [sum(w for w, _ in row) + GAP * (len(row) - 1) for row in sizes]
    row_h = [max(h for _, h in row) for row in sizes]
    caption = [ln for ln in expl.lines]
    wrap = 150
    caption = [chunk for ln in caption for chunk in (ln[i:i + wrap] for i in range(0, len(ln), wrap))]
    fig_w = max(max(row_w) + 2 * GAP, 0.075 * min(wrap, max((len(ln) for ln in caption), default=0)) + 2 * GAP, 4.0)
    fig_h = 0.6 + sum(row_h) + GAP * len(row_h) + LINE * len(caption) + 0.3
    fig = Figure(figsize=(fig_w, fig_h))
    fig.text(0.5, 1 - 0.3 / fig_h, expl.title, ha="center", va="center", fontsize=12, fontweight="bold")
    y = fig_h - 0.6
    for row, sz, h in zip(expl.rows, sizes, row_h):
        y -= h
        x = GAP
        for p, (w, ph) in zip(row, sz):
            _draw_panel(fig, p, x + (w - p.values.shape[1] * CELL) / 2, y + (h - ph), fig_w, fig_h)
            x += w + GAP
        y -= GAP
    for k, ln in enumerate(caption):
        fig.text(GAP / fig_w, (y - k * LINE) / fig_h, ln, ha="left", va="top", fontsize=8, family="monospace")
    return _save(fig, Path(path))


def draw_receptive_field(expl: Explanation, path: str | Path) -> Path:
    """The input grid with the centre unit's receptive field, and r and j per layer, in one PNG."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    d = expl.data
    size = d["input_size"]
    top, left, rh, rw = d["box"]
    chosen = d["chosen"]
    fig = Figure(figsize=(12, 5.6))
    ax = fig.add_subplot(1, 2, 1)
    ax.add_patch(Rectangle((0, 0), size, size, facecolor="0.93", edgecolor="black", linewidth=1.2))
    ax.add_patch(Rectangle((left, top), rw, rh, facecolor="tab:red", alpha=0.18, edgecolor="tab:red",
                           linewidth=2, linestyle="--"))
    clip = (max(left, 0), max(top, 0), min(left + rw, size), min(top + rh, size))
    ax.add_patch(Rectangle((clip[0], clip[1]), clip[2] - clip[0], clip[3] - clip[1], fill=False,
                           edgecolor="tab:red", linewidth=2))
    fields = d["fields"]
    jy, jx = fields[0][-1].total_stride, fields[1][-1].total_stride
    sy, sx = fields[0][-1].start, fields[1][-1].start
    out_h, out_w = chosen.output_shape[-2:]
    step_y, step_x = max(1, out_h // 24), max(1, out_w // 24)
    ys = [sy + u * jy for u in range(0, out_h, step_y)]
    xs = [sx + u * jx for u in range(0, out_w, step_x)]
    ax.scatter([x for _ in ys for x in xs], [y for y in ys for _ in xs], s=4, color="tab:blue",
               label=f"unit centres of {chosen.name}" + (f" (every {step_y}th)" if step_y > 1 else ""))
    cy, cx = d["centre"]
    ax.scatter([cx], [cy], s=40, color="tab:red", zorder=3, label=f"unit {d['unit']}")
    lo = min(0, top, left) - 4
    hi = max(size, top + rh, left + rw) + 4
    ax.set_xlim(lo, hi)
    ax.set_ylim(hi, lo)
    ax.set_aspect("equal")
    ax.set_title(f"{d['model']}: {chosen.name} unit {d['unit']} sees {rh}x{rw} input pixels "
                 f"(stride {jy})", fontsize=10)
    ax.set_xlabel("input column")
    ax.set_ylabel("input row")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8)

    rows = d["rows"]
    ax2 = fig.add_subplot(1, 2, 2)
    ks = range(len(rows))
    ax2.plot(ks, [r.receptive_field[0] for r in rows], "o-", color="tab:red", label="receptive field r")
    ax2.plot(ks, [r.total_stride[0] for r in rows], "s-", color="tab:blue", label="total stride j")
    ax2.axhline(size, color="0.5", linestyle=":", label=f"input size {size}")
    ax2.set_yscale("log", base=2)
    ax2.set_xticks(list(ks))
    ax2.set_xticklabels([f"{r.name.split('.')[-1]} {r.type.replace('2d', '')}" for r in rows], rotation=90,
                        fontsize=7)
    ax2.set_title("per sliding-window layer", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, Path(path))
