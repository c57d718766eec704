"""The merge's own statistics (share, kept, elected agreement), summed while it runs.

The kernels write a few sums per chunk into a small device tensor (no sync per
chunk); the engine adds a key's sums here once per key.  Everything is kept as
plain float sums per (block, model) so that worker processes can send theirs
to the parent as JSON and the parent adds them (see parallel.py).

Per model t and block, over the merged elements of the block's keys:

- ``mass``: sum |A_t w_t tau_t| (after drop, trim, weight and election; the
  factors common to all models of a key, rescale and alpha, are left out since
  a block's keys share them and shares are ratios);
- ``nonzero``: elements whose delta is non-zero before drop and trim;
- ``survived``: elements whose delta is still non-zero after drop and trim;
- ``agree``: elements where the model has the elected sign (methods with an
  election).

From them (``to_dict``, the names of /tmp/coord/analysis-schema.md):
share = mass / sum over models of mass; kept = survived / nonzero (1 where
nothing was dropped or trimmed: a delta that is zero has nothing to lose);
elected_agreement = sum agree / sum survived, i.e. among the deltas that
survived drop and trim, the fraction whose sign is the elected one (the mean
fraction of the voting models that agree, each element weighted by its number
of voters).

The counts (nonzero, survived, agree) and the mass of methods without an
election are taken on each key's first and every ``engine.STATS_EVERY``-th
chunk, a fixed sample that keeps their cost near 10 % of a CPU merge; the
elected methods' mass is summed over every chunk.  ``STATS_EVERY = 1`` counts
everything (the tests compare that with the readable kernel steps).
"""
from __future__ import annotations

import os
import threading
from typing import Sequence

from ..arch import VAE, block_labels, block_of, component_of

MASS, AGREE, NONZERO, SURVIVED = range(4)   # kernels.STAT_MASS, STAT_AGREE, STAT_NONZERO, STAT_SURVIVED
FIELDS = 4
SCHEMA_VERSION = 1


def key_block(key: str, arch: str) -> str | None:
    """The figure block of a key: arch.block_of, "VAE" for VAE keys, None for keys left out (EMA, other)."""
    if component_of(key) == VAE:
        return "VAE"
    return block_of(key, arch)


def model_labels(paths: Sequence[str]) -> list[str]:
    """The models' names in the JSON: file names, with the parent folder where two share one.

    A name still repeated (the same file given twice) gets " #2", " #3"...,
    since each is a separate entry of the merge.
    """
    names = [os.path.basename(p) for p in paths]
    labels = []
    for path, name in zip(paths, names):
        folders = {os.path.dirname(os.path.abspath(p)) for p, n in zip(paths, names) if n == name}
        if len(folders) > 1:   # the same name in different folders
            parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
            name = f"{parent}/{name}" if parent else name
        labels.append(name)
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if labels.count(label) == 1 else f"{label} #{seen[label]}")
    return out


def figure_blocks(arch: str, with_vae: bool) -> list[str]:
    return block_labels(arch) + (["VAE"] if with_vae else [])


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


class MergeStats:
    """Sums of one merge, per block and model index (thread-safe: merger threads add whole keys)."""

    def __init__(self, arch: str, n_models: int, counts: bool, elect: bool) -> None:
        """``counts``: the method drops or trims (kept is measured); ``elect``: it elects a sign."""
        self.arch = arch
        self.n_models = n_models
        self.counts = counts
        self.elect = elect
        self.sums: dict[str, list[list[float]]] = {}
        self._lock = threading.Lock()

    def add_key(self, key: str, models: Sequence[int], rows: Sequence[Sequence[float]]) -> None:
        """Add one key's sums: ``rows[f][j]`` is field f of the j-th model present (``models[j]``)."""
        block = key_block(key, self.arch)
        if block is None:
            return
        with self._lock:
            table = self.sums.setdefault(block, [[0.0] * self.n_models for _ in range(FIELDS)])
            for f in range(FIELDS):
                for j, index in enumerate(models):
                    table[f][index] += float(rows[f][j])

    def take(self) -> dict[str, list[list[float]]]:
        """The sums so far, and start again from zero (a worker process sends them after each group)."""
        with self._lock:
            out, self.sums = self.sums, {}
        return out

    def add_sums(self, sums: dict[str, list[list[float]]]) -> None:
        """Add sums taken elsewhere (a worker process's)."""
        with self._lock:
            for block, table in sums.items():
                mine = self.sums.setdefault(block, [[0.0] * self.n_models for _ in range(FIELDS)])
                for f in range(FIELDS):
                    for i in range(self.n_models):
                        mine[f][i] += float(table[f][i])

    def to_dict(self, recipe, names: Sequence[str] | None = None) -> dict:
        """The schema's dict for a merge: models, blocks, method, recipe, share, kept, elected_agreement.

        ``recipe`` is the resolved MergeRecipe.  No input figures (delta_norm,
        cosine, sign_conflict): those come from :func:`lib_merge.analysis.analyze`.
        """
        names = list(names) if names is not None else model_labels(recipe.models)
        vae = self.sums.get("VAE")
        with_vae = vae is not None and any(v > 0 for v in vae[MASS] + vae[SURVIVED])
        blocks = figure_blocks(self.arch, with_vae)
        empty = [[0.0] * self.n_models for _ in range(FIELDS)]
        share: dict[str, dict] = {name: {} for name in names}
        kept: dict[str, dict] = {name: {} for name in names}
        agreement: dict[str, float | None] = {}
        for block in blocks:
            table = self.sums.get(block, empty)
            total = sum(table[MASS])
            for i, name in enumerate(names):
                share[name][block] = _ratio(table[MASS][i], total)
                if not self.counts:
                    kept[name][block] = 1.0
                else:
                    kept[name][block] = 1.0 if table[NONZERO][i] <= 0 else table[SURVIVED][i] / table[NONZERO][i]
            agreement[block] = _ratio(sum(table[AGREE]), sum(table[SURVIVED])) if self.elect else None
        overall = dict(zip(names, self.overall_share()))
        return _finite({"version": SCHEMA_VERSION, "arch": self.arch, "base": os.path.basename(recipe.base),
                        "models": names, "blocks": blocks, "method": recipe.method,
                        "recipe": _recipe_json(recipe), "share": share, "kept": kept,
                        "elected_agreement": agreement, "overall_share": overall})

    def overall_share(self) -> list[float | None]:
        """Each model's share of the whole merged delta (all blocks together)."""
        totals = [sum(table[MASS][i] for table in self.sums.values()) for i in range(self.n_models)]
        whole = sum(totals)
        return [_ratio(t, whole) for t in totals]


def _recipe_json(recipe) -> dict:
    """The recipe as stored in a merged file (knobs, input file names and paths; no hashes here)."""
    return recipe.to_json_dict()


def _finite(value):
    """NaN/Inf (a merge allowed to produce them) become null: JSON has no NaN."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def summary_line(stats: dict) -> str:
    """One line for a merge report: each model's overall share of the merged delta, and the kept fraction."""
    share = stats.get("overall_share") or {}
    parts = [f"{name} {value * 100:.0f}%" for name, value in share.items() if value is not None]
    return "share of the merged delta: " + (", ".join(parts) if parts else "none (every model equals the base)")
