"""The drift chart of the advisor's alert: current vs. target weight per asset class, band shown.

One horizontal row per asset class: the band (target ± band) as a shaded range, the target as a
dark tick, the current weight as a bar — red when the class is outside its band, blue inside.

Rendered with matplotlib's Agg canvas on a `Figure` of its own (no pyplot: no global state, safe
in threads and in a Dagster worker without a display). The PNG is always CHART_WIDTH_PX ×
CHART_HEIGHT_PX (2× the size it is shown at in the email, so it is sharp on high-density
screens), and carries no "Software" metadata, so the same bands give the same bytes.
"""

from __future__ import annotations

import io
from typing import Sequence

from matplotlib.figure import Figure
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.patches import Patch
from matplotlib.lines import Line2D

from rebal_pipeline.workflow.package import PackageBand

# Shown at 640 × 320 CSS pixels in the email; rendered at 2×.
DISPLAY_WIDTH_PX = 640
DISPLAY_HEIGHT_PX = 320
_DPI = 200
CHART_WIDTH_PX = DISPLAY_WIDTH_PX * 2
CHART_HEIGHT_PX = DISPLAY_HEIGHT_PX * 2

_INSIDE = "#2f6db5"
_OUTSIDE = "#c0392b"
_BAND = "#d5e8d4"
_TARGET = "#1b1b1b"
# Exactly at the band is inside (the drift rule of stage 1); float noise is not a breach.
_EPS = 1e-9


def class_label(asset_class: str) -> str:
    """'fixed_income' -> 'Fixed income' (the words the advisor reads in the table too)."""
    return asset_class.replace("_", " ").strip().capitalize() or asset_class


def is_outside(band: PackageBand) -> bool:
    return abs(band.drift) > band.band + _EPS


def _short(label: str, limit: int = 16) -> str:
    """Axis labels fit the left margin: long class names are cut with an ellipsis."""
    return label if len(label) <= limit else label[: limit - 1].rstrip() + "\u2026"


def drift_chart(bands: Sequence[PackageBand], title: str = "Current vs. target by asset class") -> bytes:
    """PNG bytes of the drift chart for the scope's bands (order kept as given, top to bottom)."""
    if not bands:
        raise ValueError("drift_chart: no bands to draw")
    fig = Figure(figsize=(CHART_WIDTH_PX / _DPI, CHART_HEIGHT_PX / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.17, 0.21, 0.8, 0.67))
    n = len(bands)
    rows = list(range(n))[::-1]  # first band on top
    label_size = 8 if n <= 6 else 6.5
    # Each row's rightmost mark (bar or band); the axis leaves a fifth of its width for the labels.
    ends = [max(b.current_weight, b.target_weight + b.band) for b in bands]
    x_max = max(0.05, max(ends)) / 0.8
    for row, band, end in zip(rows, bands, ends):
        low, high = max(0.0, band.target_weight - band.band), band.target_weight + band.band
        ax.barh(row, high - low, left=low, height=0.78, color=_BAND, edgecolor="#9cc59a", linewidth=0.6, zorder=1)
        colour = _OUTSIDE if is_outside(band) else _INSIDE
        ax.barh(row, band.current_weight, height=0.42, color=colour, zorder=2)
        ax.plot([band.target_weight] * 2, [row - 0.39, row + 0.39], color=_TARGET, linewidth=1.6, zorder=3)
        # The label sits right of both the bar and the band, so it never crosses the target tick.
        ax.text(end + x_max * 0.015, row, f"{band.current_weight * 100:.1f}% vs. {band.target_weight * 100:.1f}%",
                va="center", ha="left", fontsize=label_size, color=colour, zorder=4)
    ax.set_yticks(rows, [_short(class_label(b.asset_class)) for b in bands], fontsize=label_size + 0.5)
    ax.set_xlim(0, x_max)
    ax.set_ylim(-0.6, n - 0.4)
    step = 10 if x_max > 0.3 else 5
    ticks = [t / 100 for t in range(0, int(min(1.0, x_max) * 100) + 1, step)]
    ax.set_xticks(ticks, [f"{t * 100:.0f}%" for t in ticks], fontsize=8)
    ax.grid(axis="x", color="#e6e6e6", linewidth=0.5, zorder=0)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(title, fontsize=9.5, loc="left", pad=6)
    fig.legend(
        handles=[Patch(color=_INSIDE, label="Current (inside band)"),
                 Patch(color=_OUTSIDE, label="Current (outside band)"),
                 Line2D([], [], color=_TARGET, linewidth=1.6, label="Target"),
                 Patch(facecolor=_BAND, edgecolor="#9cc59a", label="Band (target ± band)")],
        loc="lower center", ncol=4, fontsize=7.5, frameon=False, bbox_to_anchor=(0.5, 0.0),
    )
    out = io.BytesIO()
    # No Software/creation metadata: identical input, identical bytes.
    fig.savefig(out, format="png", dpi=_DPI, metadata={"Software": None})
    return out.getvalue()
