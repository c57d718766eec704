"""The pictures of a merge analysis (issue 13): block norms, similarity, sign conflict, each model's share.

Drawn from the plain dict of ``analysis.json`` (``lib_merge.analysis.analyze`` or a merge's own
statistics), so the CLI, the tab and anyone holding the JSON get the same figures.  Matplotlib's
object API only (``Figure`` + the Agg canvas): no ``pyplot``, so nothing global changes inside a WebUI
that uses matplotlib itself, and figures can be drawn on several threads.

Titles and captions are written for someone who never read the TIES or DARE papers: each says what
the picture shows and which way is "more".
"""
from __future__ import annotations

import io
import math
import os
import textwrap
from typing import Any, Mapping, Sequence

from ..errors import MergeError

# The plots in the order they are written, drawn and shown; each one is skipped when its keys are absent.
PLOT_ORDER = ("norms", "cosine", "conflict", "share", "kept")
FILE_NAMES = {name: f"{i + 1}-{name}.png" for i, name in enumerate(PLOT_ORDER)}
TITLES = {
    "norms": "How much each model changed, per block",
    "cosine": "How alike the models' changes are",
    "conflict": "Where the models disagree on direction",
    "share": "Who the merge listens to, per block",
    "kept": "How much of each model survives the drop and trim",
}
CAPTIONS = {
    "norms": "Size of each model's difference from the base in each block (L2 norm) - brighter = bigger change.",
    "cosine": "1 = the two models changed the weights the same way, 0 = unrelated changes, -1 = opposite.",
    "conflict": "Bars: share of changed weights where the models push in opposite directions (+ vs -).",
    "share": "Each bar splits the merged change of one block between the models (fractions sum to 1).",
    "kept": "Fraction of each model's changed weights left after the random drop (p) and the trim (k).",
}
MAX_TICKS = 30          # at most this many labels on an axis; with more models every n-th is labelled
MAX_LEGEND = 10         # the share plot names at most this many models; the rest are grouped as "others"
MAX_NAME = 28           # model names are shortened to this many characters
DPI = 100


def _matplotlib():
    """The two matplotlib pieces used, or one clear line when it is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MergeError("the plots need matplotlib (pip install matplotlib); analysis.json is written "
                         "without it") from None
    return Figure, FigureCanvasAgg


def _short(name: str) -> str:
    """A model name fit for a tick label: the file name without .safetensors, cut in the middle if long."""
    base = os.path.basename(name.replace("\\", "/")) or name
    for ext in (".safetensors", ".ckpt"):
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
    return base if len(base) <= MAX_NAME else base[: MAX_NAME // 2 - 1] + "..." + base[-(MAX_NAME // 2 - 2):]


def _number(value: Any) -> float:
    """A JSON number or null as a float (NaN for null, non-finite or anything not a number)."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def _names(analysis: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(models, blocks) of an analysis, refused in one line when they are missing."""
    if not isinstance(analysis, Mapping):
        raise MergeError("an analysis must be a JSON object (analysis.json)")
    models, blocks = analysis.get("models"), analysis.get("blocks")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise MergeError("analysis: 'models' must be a non-empty list of names")
    if not isinstance(blocks, list) or not blocks or not all(isinstance(b, str) for b in blocks):
        raise MergeError("analysis: 'blocks' must be a non-empty list of block names")
    return models, blocks


def _grid(table: Any, models: Sequence[str], blocks: Sequence[str]) -> list[list[float]]:
    """models x blocks from {model: {block: value}} (missing or null -> NaN)."""
    table = table if isinstance(table, Mapping) else {}
    rows = []
    for model in models:
        row = table.get(model)
        row = row if isinstance(row, Mapping) else {}
        rows.append([_number(row.get(block)) for block in blocks])
    return rows


def available(analysis: Mapping[str, Any]) -> list[str]:
    """The plots this analysis has the numbers for, in :data:`PLOT_ORDER`."""
    keys = {"norms": "delta_norm", "cosine": "cosine", "conflict": "sign_conflict", "share": "share",
            "kept": "kept"}
    has = {name for name in PLOT_ORDER if isinstance(analysis.get(keys[name]), (Mapping, list))}
    if isinstance(analysis.get("elected_agreement"), Mapping):   # a merge's own statistics: agreement only
        has.add("conflict")
    return [name for name in PLOT_ORDER if name in has]


def _ticks(count: int) -> list[int]:
    """Indices to label on an axis of ``count`` items: all of them up to MAX_TICKS, else every n-th."""
    step = max(1, math.ceil(count / MAX_TICKS))
    return list(range(0, count, step))


def _new_figure(name: str, width: float, height: float):
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")   # labels and legends fit
    FigureCanvasAgg(fig)
    fig.suptitle(TITLES[name], fontsize=12, fontweight="bold")
    fig.supxlabel(textwrap.fill(CAPTIONS[name], width=max(40, int(width * 13))), fontsize=8.5, color="#444444")
    return fig


def _block_axis(ax, blocks: Sequence[str]) -> None:
    ax.set_xticks(range(len(blocks)))
    ax.set_xticklabels(blocks, rotation=90, fontsize=8)
    ax.set_xlabel("block (BASE = text encoder, IN = down, M = middle, OUT = up)", fontsize=9)


def _model_axis(ax, models: Sequence[str]) -> None:
    ticks = _ticks(len(models))
    ax.set_yticks(ticks)
    ax.set_yticklabels([_short(models[i]) for i in ticks], fontsize=8 if len(models) <= 20 else 6)
    ax.set_ylabel("model" if len(ticks) == len(models) else f"model (one in {ticks[1] - ticks[0]} labelled)",
                  fontsize=9)


def _heatmap(name: str, grid: list[list[float]], models: Sequence[str], blocks: Sequence[str],
             colorbar: str, vmin: float | None = None, vmax: float | None = None, annotate_fmt: str = "{:.2g}"):
    import numpy as np
    data = np.ma.masked_invalid(np.array(grid, dtype=float))
    n = len(models)
    height = 2.8 + min(n * 0.28, 7.0)
    fig = _new_figure(name, max(7.0, 2.5 + len(blocks) * 0.32), height)
    ax = fig.add_subplot()
    cmap = _cmap("viridis")
    image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    _block_axis(ax, blocks)
    _model_axis(ax, models)
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label(colorbar, fontsize=8)
    if n * len(blocks) <= 120:   # few cells: print the values too
        lo = vmin if vmin is not None else (float(data.min()) if data.count() else 0.0)
        hi = vmax if vmax is not None else (float(data.max()) if data.count() else 1.0)
        for i in range(n):
            for j in range(len(blocks)):
                if data.mask is not np.ma.nomask and data.mask[i, j]:
                    continue
                value = float(data[i, j])
                ax.text(j, i, annotate_fmt.format(value), ha="center", va="center", fontsize=6,
                        color="black" if hi > lo and (value - lo) / (hi - lo) > 0.6 else "white")
    return fig


def _cmap(name: str):
    """A colormap with a grey for missing values (null in the JSON)."""
    from matplotlib import colormaps
    return colormaps[name].with_extremes(bad="#cccccc")


def norms_figure(analysis: Mapping[str, Any]):
    """Heatmap of each model's task-vector norm per block (models x blocks)."""
    models, blocks = _names(analysis)
    return _heatmap("norms", _grid(analysis.get("delta_norm"), models, blocks), models, blocks,
                    "L2 norm of (model - base)", vmin=0.0)


def cosine_figure(analysis: Mapping[str, Any]):
    """The N x N cosine similarity of the whole task vectors."""
    import numpy as np
    models, _ = _names(analysis)
    n = len(models)
    raw = analysis.get("cosine")
    if not isinstance(raw, list) or len(raw) != n or not all(isinstance(r, list) and len(r) == n for r in raw):
        raise MergeError(f"analysis: 'cosine' must be a {n} x {n} list of lists (one row per model)")
    data = np.ma.masked_invalid(np.array([[_number(v) for v in row] for row in raw], dtype=float))
    side = 1.6 + min(n * 0.3, 6.0)
    fig = _new_figure("cosine", side + 3.4, side + 2.8)
    ax = fig.add_subplot()
    image = ax.imshow(data, cmap=_cmap("RdBu_r"), vmin=-1.0, vmax=1.0, interpolation="nearest")
    ticks = _ticks(n)
    ax.set_xticks(ticks)
    ax.set_xticklabels([_short(models[i]) for i in ticks], rotation=90, fontsize=8 if n <= 20 else 6)
    ax.set_yticks(ticks)
    ax.set_yticklabels([_short(models[i]) for i in ticks], fontsize=8 if n <= 20 else 6)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label("cosine similarity", fontsize=8)
    if n <= 10:
        for i in range(n):
            for j in range(n):
                if data.mask is not np.ma.nomask and data.mask[i, j]:
                    continue
                value = float(data[i, j])
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(value) > 0.6 else "black")
    return fig


def conflict_figure(analysis: Mapping[str, Any]):
    """Sign conflict per block as bars; with a merge, the agreement with the elected sign as a line."""
    _, blocks = _names(analysis)
    table = analysis.get("sign_conflict")
    fig = _new_figure("conflict", max(7.0, 2.5 + len(blocks) * 0.32), 4.2)
    ax = fig.add_subplot()
    xs = range(len(blocks))
    if isinstance(table, Mapping):   # a merge's own statistics have only the agreement line
        values = [_number(table.get(b)) for b in blocks]
        ax.bar(xs, [0.0 if math.isnan(v) else v for v in values], color="#d95f02",
               label="models disagree on the sign")
        for x, value in zip(xs, values):
            if math.isnan(value):
                ax.text(x, 0.02, "n/a", ha="center", va="bottom", fontsize=6, rotation=90, color="#777777")
    agreement = analysis.get("elected_agreement")
    if isinstance(agreement, Mapping):
        line = [_number(agreement.get(b)) for b in blocks]
        if any(not math.isnan(v) for v in line):
            ax.plot(list(xs), line, color="#1b9e77", marker="o", markersize=3, linewidth=1.2,
                    label="models agreeing with the merge's chosen sign")
            ax.legend(fontsize=7, loc="upper right")
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("fraction of changed weights", fontsize=9)
    _block_axis(ax, blocks)
    ax.grid(axis="y", alpha=0.3)
    return fig


def share_figure(analysis: Mapping[str, Any]):
    """Each model's share of the merged change per block, as stacked bars."""
    import numpy as np
    models, blocks = _names(analysis)
    grid = np.array(_grid(analysis.get("share"), models, blocks), dtype=float)
    order = list(range(len(models)))
    if len(models) > MAX_LEGEND:   # the biggest contributors by name, the rest as one grey band
        totals = np.nan_to_num(grid).sum(axis=1)
        order = sorted(order, key=lambda i: -totals[i])
        named, rest = order[: MAX_LEGEND - 1], order[MAX_LEGEND - 1:]
        bands = [(models[i], np.nan_to_num(grid[i])) for i in named]
        bands.append((f"{len(rest)} others", np.nan_to_num(grid[rest]).sum(axis=0)))
    else:
        bands = [(models[i], np.nan_to_num(grid[i])) for i in order]
    fig = _new_figure("share", max(7.0, 2.5 + len(blocks) * 0.32) + 2.0, 4.4)
    ax = fig.add_subplot()
    colors = _cmap("tab10")
    bottom = np.zeros(len(blocks))
    for index, (label, values) in enumerate(bands):
        color = "#bbbbbb" if label.endswith(" others") and index == len(bands) - 1 and len(models) > MAX_LEGEND \
            else colors(index % 10)
        ax.bar(range(len(blocks)), values, bottom=bottom, color=color, label=_short(label), width=0.8)
        bottom = bottom + values
    empty = np.isnan(grid).all(axis=0)
    for x in np.flatnonzero(empty):
        ax.text(x, 0.02, "n/a", ha="center", va="bottom", fontsize=6, rotation=90, color="#777777")
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("share of the merged change", fontsize=9)
    _block_axis(ax, blocks)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
              title=str(analysis.get("method") or "merge"), title_fontsize=8)
    return fig


def kept_figure(analysis: Mapping[str, Any]):
    """Fraction of each model's elements kept after drop and trim (models x blocks)."""
    models, blocks = _names(analysis)
    return _heatmap("kept", _grid(analysis.get("kept"), models, blocks), models, blocks,
                    "fraction kept", vmin=0.0, vmax=1.0, annotate_fmt="{:.2f}")


DRAW = {"norms": norms_figure, "cosine": cosine_figure, "conflict": conflict_figure, "share": share_figure,
        "kept": kept_figure}


def figures(analysis: Mapping[str, Any], which: Sequence[str] | None = None) -> dict[str, Any]:
    """name -> matplotlib Figure, for every plot the analysis has numbers for (or those in ``which``)."""
    _names(analysis)
    names = [n for n in available(analysis) if which is None or n in which]
    return {name: DRAW[name](analysis) for name in names}


def png_bytes(fig) -> bytes:
    """A figure as PNG bytes (Agg canvas; nothing shown, nothing global)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def render_pngs(analysis: Mapping[str, Any], which: Sequence[str] | None = None) -> dict[str, bytes]:
    """name -> PNG bytes of every available plot (what the tab shows and the CLI writes)."""
    return {name: png_bytes(fig) for name, fig in figures(analysis, which).items()}


def write_plots(analysis: Mapping[str, Any], out_dir: str) -> list[str]:
    """Write the available plots as PNGs into ``out_dir`` (created); returns their paths in PLOT_ORDER."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise MergeError(f"cannot create the plot folder: {exc.strerror}", out_dir) from None
    paths = []
    for name, data in render_pngs(analysis).items():
        path = os.path.join(out_dir, FILE_NAMES[name])
        try:
            with open(path, "wb") as handle:
                handle.write(data)
        except OSError as exc:
            raise MergeError(f"cannot write the plot: {exc.strerror}", path) from None
        paths.append(path)
    return paths


def _cos(value: float) -> str:
    """Two decimals, without a "-0.00" for a tiny negative value."""
    return f"{round(value, 2) + 0.0:.2f}"


def _pct(value: float) -> str:
    return f"{100.0 * value:.0f} %"


def summary_text(analysis: Mapping[str, Any]) -> str:
    """A few plain lines beside the plots: the biggest change, the most/least alike pair, the worst conflict,
    and with a merge who dominates it and how much was kept."""
    import numpy as np
    models, blocks = _names(analysis)
    short = [_short(m) for m in models]
    lines = [f"{len(models)} model{'s' if len(models) != 1 else ''} over {len(blocks)} blocks"
             + (f" ({analysis['arch']})" if analysis.get("arch") else "")
             + (f", base {_short(str(analysis['base']))}" if analysis.get("base") else "")]
    norms = np.array(_grid(analysis.get("delta_norm"), models, blocks), dtype=float)
    if isinstance(analysis.get("delta_norm"), Mapping) and not np.isnan(norms).all():
        i, j = np.unravel_index(np.nanargmax(norms), norms.shape)
        lines.append(f"biggest change: {short[i]} in {blocks[j]} (norm {norms[i, j]:.3g})")
        quiet = [b for b, column in zip(blocks, norms.T) if not np.isnan(column).all()
                 and np.nanmax(column) < 0.1 * np.nanmax(norms)]
        if quiet:
            lines.append(f"barely changed (< 10 % of the biggest): {', '.join(quiet[:8])}"
                         + (" ..." if len(quiet) > 8 else ""))
    raw = analysis.get("cosine")
    if isinstance(raw, list) and len(models) > 1 and len(raw) == len(models):
        cos = np.array([[_number(v) for v in row] for row in raw], dtype=float)
        pairs = [(cos[a, b], a, b) for a in range(len(models)) for b in range(a + 1, len(models))
                 if not math.isnan(cos[a, b])]
        if len(pairs) == 1:
            lines.append(f"cosine similarity of the two: {_cos(pairs[0][0])}")
        elif pairs:
            hi, lo = max(pairs), min(pairs)
            lines.append(f"most alike: {short[hi[1]]} & {short[hi[2]]} (cosine {_cos(hi[0])}); "
                         f"least alike: {short[lo[1]]} & {short[lo[2]]} ({_cos(lo[0])})")
    conflict = analysis.get("sign_conflict")
    if isinstance(conflict, Mapping):
        values = [(_number(conflict.get(b)), b) for b in blocks]
        values = [(v, b) for v, b in values if not math.isnan(v)]
        if values:
            worst = max(values)
            mean = sum(v for v, _ in values) / len(values)
            lines.append(f"sign conflict: {_pct(mean)} on average, most in {worst[1]} ({_pct(worst[0])})")
    share = analysis.get("share")
    if isinstance(share, Mapping):
        grid = np.array(_grid(share, models, blocks), dtype=float)
        if not np.isnan(grid).all():
            mean = np.nanmean(np.where(np.isnan(grid).all(axis=0, keepdims=True), np.nan, np.nan_to_num(grid)),
                              axis=1)
            top = int(np.nanargmax(mean))
            lines.append(f"merge ({analysis.get('method') or 'merge'}): {short[top]} has the largest share, "
                         f"{_pct(float(mean[top]))} of the merged change averaged over blocks")
    kept = analysis.get("kept")
    if isinstance(kept, Mapping):
        grid = np.array(_grid(kept, models, blocks), dtype=float)
        if not np.isnan(grid).all():
            lines.append(f"kept after drop and trim: {_pct(float(np.nanmean(grid)))} of the changed weights")
    agreement = analysis.get("elected_agreement")
    if isinstance(agreement, Mapping):
        values = [_number(agreement.get(b)) for b in blocks]
        values = [v for v in values if not math.isnan(v)]
        if values:
            lines.append(f"agreement with the elected sign: {_pct(sum(values) / len(values))} of the models "
                         "on average")
    return "\n".join(lines)


__all__ = ["PLOT_ORDER", "FILE_NAMES", "TITLES", "CAPTIONS", "available", "figures", "png_bytes", "render_pngs",
           "write_plots", "summary_text", "norms_figure", "cosine_figure", "conflict_figure", "share_figure",
           "kept_figure"]
