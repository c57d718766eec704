"""The words the tab shows: progress lines, results, errors, inspect summaries.

Errors become one line (the user's mistake named, never a traceback in the
page); unexpected ones are logged with their traceback on the server console.
"""
from __future__ import annotations

import json
import logging
import os

from ..checkpoint import open_checkpoint
from ..engine import Progress
from ..errors import MergeCancelled, MergeError
from ..recipe import RECIPE_METADATA_KEY

log = logging.getLogger("dare_merge")


def error_text(exc: BaseException) -> str:
    """One line for the status area."""
    if isinstance(exc, MergeCancelled):
        return "cancelled: the merge was stopped; nothing was written and the previous result is kept"
    if isinstance(exc, MergeError):
        return f"error: {exc}"
    log.error("dare-merge: unexpected error", exc_info=exc)
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"error: {type(exc).__name__}: {first}" if first else f"error: {type(exc).__name__}"


def progress_text(ev: Progress | None, what: str = "merging") -> str:
    if ev is None:
        return f"{what}: starting…"
    pct = 100.0 * ev.bytes_done / ev.bytes_total if ev.bytes_total else 0.0
    return (f"{what}: {ev.keys_done}/{ev.keys_total} keys ({pct:.0f}%), "
            f"{ev.bytes_done / 1e9:.2f} of {ev.bytes_total / 1e9:.2f} GB, {ev.seconds:.1f} s")


def merged_text(result, hot_loaded: bool) -> str:
    """Status after a merge: what happened, the merge's name, and what to do next."""
    lines = [result.report.summary(), used_text(result.recipe),
             f"name: {result.name} (recipe hash {result.recipe_hash})"]
    if hot_loaded:
        lines.append("hot-loaded into the running model; generate to try it, Save to keep it")
    else:
        lines.append("kept in memory; Save writes it to the checkpoint folder without merging again")
    return "\n".join(lines)


def used_text(recipe) -> str:
    """The knob values the merge used (after the method's presets): what the sliders should read."""
    r = recipe.resolved()
    parts = [f"p {r.p:g}", f"k {r.k:g}", f"alpha {r.alpha:g}", f"λ {r.lam:g}",
             f"vote_sgn {'on' if r.vote_sgn else 'off'}", f"seed {r.seed}", f"{r.merge}",
             "weights " + ", ".join(f"{w:g}" for w in r.weights)]
    if r.alpha_unet is not None or r.alpha_te is not None:
        parts.insert(3, f"alpha UNet {r.alpha_unet if r.alpha_unet is not None else r.alpha:g} / "
                        f"text encoder {r.alpha_te if r.alpha_te is not None else r.alpha:g}")
    if r.epsilon is not None and "epsilon" in r.spec.uses:
        parts.insert(1, f"ε {r.epsilon:g}")
    if r.beta is not None and "beta" in r.spec.uses:
        parts.insert(2, f"β {r.beta:g}")
    if r.rescale == "unbiased":
        parts.append("rescale unbiased")
    if r.block_alpha or r.block_p or r.block_k:
        parts.append("block values set")
    return "used: " + ", ".join(parts)


def inspect_text(path: str) -> str:
    """What `python -m lib_merge inspect` prints, as one text block."""
    with open_checkpoint(path) as ckpt:
        summary = ckpt.summary()
        raw = ckpt.metadata.get(RECIPE_METADATA_KEY)
    lines = [f"{os.path.basename(summary['file'])}: {summary['architecture']}, {summary['keys']} keys, "
             f"{summary['size_bytes'] / 1e9:.3f} GB"]
    for name, comp in summary["components"].items():
        dtypes = ", ".join(f"{d} x{c}" for d, c in comp["dtypes"].items())
        lines.append(f"  {name:6s} {comp['keys']:5d} keys {comp['params'] / 1e6:9.2f} M params  {dtypes}")
    try:
        recipe = json.loads(raw) if raw else None
    except ValueError:
        recipe = None
    if recipe:
        knobs = {k: v for k, v in recipe.items() if k not in ("base", "models", "format") and v is not None}
        lines.append(f"  recipe: {json.dumps(knobs, sort_keys=True)}")
        lines.append(f"  base: {recipe['base']['file']} {recipe['base'].get('hash', '')}")
        lines.extend(f"  model: {m['file']} {m.get('hash', '')}" for m in recipe["models"])
    else:
        lines.append("  no merge recipe stored")
    return "\n".join(lines)
