"""``analyze``: what the inputs of a merge hold, and (with a method) what the merge does with them.

One streaming pass over the keys, opened exactly as a merge opens them
(``engine.MergePlan``: validated files, LoRA files bound to the base and read
as base + delta), each key read in element chunks of all N models at once
(``engine.flat_source``: ranged reads), so memory stays O(one chunk) for any N.
Per chunk, float32 task vectors tau_t = theta_t - theta0 feed float64 sums:

- the N x N Gram matrix of the task vectors (tau tau^T in float64), per block:
  its diagonal gives ``delta_norm`` (block -> L2 norm), the whole matrix the
  ``cosine`` of the whole task vectors;
- per block, the elements where >= 2 models have a non-zero delta, and those of
  them whose non-zero deltas do not all share one sign: ``sign_conflict``.

With a method (a ``MergeRecipe``), the merge itself runs once more, in memory
and with nothing written (``engine.iter_merge`` with ``stats=True``), and its
statistics (``share``, ``kept``, ``elected_agreement``; see stats.py), counted
on every chunk (a merge someone waits on counts one chunk in ``engine.STATS_EVERY``),
join the dict.  The names are documented in README ("Analysis: see inside a merge").
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from typing import Callable, Sequence

import torch

from ..checkpoint import Checkpoint, open_checkpoint
from ..engine import CancelToken, MergePlan, Progress, flat_source, iter_merge
from ..recipe import MergeRecipe
from .stats import SCHEMA_VERSION, figure_blocks, key_block, model_labels

ELEMENTS_PER_READ = 1 << 22   # elements of one chunk over all N models' rows: 16 MB of float32


def analyze(base: str | None = None, models: Sequence[str] | None = None, recipe: MergeRecipe | None = None,
            device: str = "cpu", progress: Callable[[Progress], None] | None = None,
            cancel: CancelToken | None = None, out_dtype: str = "fp16",
            opener: Callable[[str], Checkpoint] = open_checkpoint, on_mismatch: str = "error") -> dict:
    """The analysis JSON (a dict of plain types) of ``base`` + ``models``, and of ``recipe``'s merge if given.

    ``base``/``models`` default to the recipe's; given with a recipe they replace its inputs.
    Without a recipe only the inputs are measured (delta_norm, whole_norm, cosine, sign_conflict);
    ``on_mismatch`` ("error" or "skip": leave out a model's keys whose shape differs) applies then.
    ``progress`` is called after each key of each pass (the keys of both passes counted in its totals);
    ``cancel`` stops within one chunk (MergeCancelled).  Bad input raises the engine's one-line errors.
    """
    if recipe is None and (base is None or not models):
        raise ValueError("analyze: give base and models, or a recipe")
    if recipe is not None and (base is not None or models is not None):
        recipe = replace(recipe, base=base if base is not None else recipe.base,
                         models=list(models) if models is not None else list(recipe.models), mask_ids=None)
    base = base if base is not None else recipe.base
    models = list(models) if models is not None else list(recipe.models)
    # the inputs are read as a merge reads them; every float key of UNet, text encoders and VAE counts
    probe = MergeRecipe("add_difference", base, models, vae="merge",
                        on_mismatch=recipe.on_mismatch if recipe is not None else on_mismatch)
    plan = MergePlan(probe, "fp32", opener=opener)
    merge_plan = None
    try:
        if recipe is not None:   # planned (and refused) before the long pass, so bad knobs fail at once
            merge_plan = MergePlan(recipe, out_dtype, opener=opener, stats=True)
            merge_plan.stats_every = 1   # an analysis counts every chunk: its figures are exact, not sampled
        ticker = _Ticker(progress, plan, merge_plan)
        result = _input_figures(plan, torch.device(device), ticker, cancel)
        result["notes"] = _input_notes(plan)
    finally:
        plan.close()
    if merge_plan is not None:
        try:
            for _ in iter_merge(merge_plan, device, ticker.merge_progress, cancel):
                pass
            _join_merge(result, merge_plan.report.stats)
            result["notes"] += [n for n in merge_plan.report.notes if n not in result["notes"]]
        finally:
            merge_plan.close()
    return result


def _input_notes(plan: MergePlan) -> list[str]:
    """What the figures leave out, in the merge report's words: keys a model lacks or has extra, skipped shapes."""
    report = plan.report
    lines = [f"{name} lacks {len(keys)} keys of the base (e.g. {keys[0]}); its change there counts as zero"
             for name, keys in report.missing.items()]
    lines += [f"{name} has {len(keys)} keys the base lacks (e.g. {keys[0]}); they are left out"
              for name, keys in report.extra.items()]
    return lines + list(report.mismatches) + list(report.notes)


def write_analysis(analysis: dict, out_dir: str) -> str:
    """Write ``analysis.json`` into ``out_dir`` (created if missing) through a temporary file; its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "analysis.json")
    temp = path + ".tmp"
    with open(temp, "w", encoding="utf-8") as handle:
        json.dump(analysis, handle, indent=1, allow_nan=False)
        handle.write("\n")
    os.replace(temp, path)
    return path


class _Ticker:
    """Progress over both passes: the input pass's keys, then the merge's."""

    def __init__(self, progress, plan: MergePlan, merge_plan: MergePlan | None) -> None:
        self.progress = progress
        self.started = time.perf_counter()
        self.first_keys = len(plan.tasks)
        self.first_bytes = sum(_input_bytes(plan, t) for t in plan.tasks)
        self.keys_total = self.first_keys + (len(merge_plan.tasks) if merge_plan is not None else 0)
        self.bytes_total = self.first_bytes + (sum(t.nbytes for t in merge_plan.tasks) if merge_plan else 0)
        self.keys_done = 0
        self.bytes_done = 0

    def input_key(self, key: str, nbytes: int) -> None:
        self.keys_done += 1
        self.bytes_done += nbytes
        if self.progress is not None:
            self.progress(Progress(self.keys_done, self.keys_total, self.bytes_done, self.bytes_total, key,
                                   time.perf_counter() - self.started))

    def merge_progress(self, ev: Progress) -> None:
        if self.progress is not None:
            self.progress(Progress(self.first_keys + ev.keys_done, self.keys_total, self.first_bytes + ev.bytes_done,
                                   self.bytes_total, ev.key, time.perf_counter() - self.started))


def _input_bytes(plan: MergePlan, task) -> int:
    """The input pass's progress unit for a key: its float32 bytes, for the base and each model present."""
    if task.action != "merge":
        return 0
    return task.nbytes * (1 + len(task.models))


def _sources(plan: MergePlan, task) -> tuple[object, list[object]]:
    """The base's and the present models' flat element sources for a key (the inpainting conv: its shared channels)."""
    if task.channel_slice is None:
        return (flat_source(plan.base, task.key),
                [flat_source(plan.models[i], task.key) for i in task.models])
    c = task.channel_slice
    base = plan.base.tensor(task.key)[:, :c].contiguous().reshape(-1)
    return base, [plan.models[i].tensor(task.key)[:, :c].contiguous().reshape(-1) for i in task.models]


def _input_figures(plan: MergePlan, device: torch.device, ticker: _Ticker, cancel: CancelToken | None) -> dict:
    for model in plan.models:   # LoRA inputs build their deltas on this device
        if hasattr(model, "use_device"):
            model.use_device(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":   # chunk-sized ops: torch's thread pool pays a barrier per op (see engine.iter_merge)
        torch.set_num_threads(1)
    try:
        return _walk_keys(plan, device, ticker, cancel)
    finally:
        torch.set_num_threads(threads)


def _walk_keys(plan: MergePlan, device: torch.device, ticker: _Ticker, cancel: CancelToken | None) -> dict:
    n_models = len(plan.models)
    grams: dict[str, list[list[float]]] = {}
    conflicts: dict[str, list[int]] = {}   # block -> [elements with >= 2 non-zero deltas, of them in conflict]
    for task in plan.tasks:
        if cancel is not None:
            cancel.check()
        block = key_block(task.key, plan.arch)
        if task.action != "merge" or block is None:
            ticker.input_key(task.key, 0)
            continue
        gram, multi, conflict = _key_figures(plan, task, device, cancel)
        table = grams.setdefault(block, [[0.0] * n_models for _ in range(n_models)])
        for a, i in enumerate(task.models):
            for b, j in enumerate(task.models):
                table[i][j] += gram[a][b]
        counts = conflicts.setdefault(block, [0, 0])
        counts[0] += multi
        counts[1] += conflict
        ticker.input_key(task.key, _input_bytes(plan, task))
    vae = grams.get("VAE")
    blocks = figure_blocks(plan.arch, vae is not None and any(vae[i][i] > 0 for i in range(n_models)))
    names = model_labels(plan.recipe.models)
    whole = [[0.0] * n_models for _ in range(n_models)]
    for block in blocks:
        for i in range(n_models):
            for j in range(n_models):
                whole[i][j] += grams[block][i][j] if block in grams else 0.0
    delta_norm = {name: {block: math.sqrt(max(grams[block][i][i], 0.0)) if block in grams else 0.0
                         for block in blocks} for i, name in enumerate(names)}
    whole_norm = {name: math.sqrt(max(whole[i][i], 0.0)) for i, name in enumerate(names)}
    cosine = [[_cosine(whole, i, j) for j in range(n_models)] for i in range(n_models)]
    sign_conflict = {block: (conflicts[block][1] / conflicts[block][0]
                             if block in conflicts and conflicts[block][0] > 0 else None) for block in blocks}
    return {"version": SCHEMA_VERSION, "arch": plan.arch, "base": os.path.basename(plan.recipe.base),
            "models": names, "blocks": blocks, "delta_norm": delta_norm, "whole_norm": whole_norm,
            "cosine": cosine, "sign_conflict": sign_conflict}


def _cosine(gram: list[list[float]], i: int, j: int) -> float | None:
    if gram[i][i] <= 0 or gram[j][j] <= 0:
        return None
    if i == j:
        return 1.0
    return max(-1.0, min(1.0, gram[i][j] / math.sqrt(gram[i][i] * gram[j][j])))


def _key_figures(plan: MergePlan, task, device: torch.device,
                 cancel: CancelToken | None) -> tuple[list[list[float]], int, int]:
    """(Gram matrix of the present models' task vectors, elements with >= 2 non-zero deltas, of them in conflict)."""
    base, models = _sources(plan, task)
    rows = len(models)
    n = base.numel()
    step = max(1 << 12, ELEMENTS_PER_READ // rows)
    gram = torch.zeros((rows, rows), dtype=torch.float64, device=device)
    multi = torch.zeros((), dtype=torch.int64, device=device)
    conflict = torch.zeros((), dtype=torch.int64, device=device)
    taus = torch.empty((rows, min(step, n)), dtype=torch.float32, device=device)
    for start in range(0, n, step):
        if cancel is not None:
            cancel.check()
        stop = min(n, start + step)
        block = taus[:, :stop - start]
        theta0 = base[start:stop].to(device=device, dtype=torch.float32)
        for j, model in enumerate(models):
            block[j].copy_(model[start:stop])
        block.sub_(theta0)
        wide = block.double()
        gram += torch.einsum("in,jn->ij", wide, wide)
        # with s = sign(tau): the non-zero deltas at an element all share one sign iff |sum s| = sum |s|
        signs = torch.sign(block)
        votes = signs[0].clone()
        voters = signs[0].abs()
        for j in range(1, rows):   # row by row: contiguous adds, cheaper than a reduction over dim 0
            votes.add_(signs[j])
            voters.add_(signs[j].abs_())
        multi += torch.count_nonzero(voters >= 2)
        conflict += torch.count_nonzero(votes.abs_() < voters)
    return gram.tolist(), int(multi), int(conflict)


def _join_merge(result: dict, stats: dict | None) -> None:
    """Add the merge's figures to the inputs' dict, on the inputs' block list (null where the merge has none)."""
    if not stats:
        return
    blocks = result["blocks"]
    for extra in stats["blocks"]:
        if extra not in blocks:
            blocks.append(extra)
    result["method"] = stats["method"]
    result["recipe"] = stats["recipe"]
    for name in ("share", "kept"):
        result[name] = {model: {block: stats[name].get(model, {}).get(block) for block in blocks}
                        for model in result["models"]}
    result["elected_agreement"] = {block: stats["elected_agreement"].get(block) for block in blocks}
    result["overall_share"] = stats.get("overall_share")
