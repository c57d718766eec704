"""``python -m lib_merge selftest``: does the merge behave on *this* machine's torch and device?

The merge's correctness claims (bit-identical results on CPU and GPU, an
exact trim threshold, results on the CPU, VRAM given back, a CPU fallback
when the GPU is full) were made on one torch and, for CUDA, without a GPU.
This runs them on the user's own torch and device in a few minutes, with
small synthetic checkpoints (:mod:`lib_merge.synth`, scaled down) in a
temporary folder, and returns a report to paste into a bug report:

    python -m lib_merge selftest --device cuda --arch sdxl --json report.json

:func:`run_selftest` returns the report as a dict (also written as JSON by
the CLI) and :func:`format_report` renders it as text, so the WebUI tab can
offer the same self-test as a button.  Each check is ``PASS``, ``FAIL``,
``SKIP`` (with the reason, e.g. no CUDA) or ``INFO`` (a measurement without a
target at this size or on this device), with its figures.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from . import kernels
from .checkpoint import open_checkpoint
from .compat import (OUT_OF_MEMORY_ERRORS, cuda_index, cuda_ready, describe_torch, empty_cache,
                     memory_allocated, memory_reserved, synchronize)
from .devices import accelerator_name, resolve_merge_device
from .engine import INPAINT_KEY, MergePlan, iter_merge
from .errors import MergeError
from .input_cache import MB, InputCache, device_key, session_reads_from
from .methods import METHODS
from .recipe import MergeRecipe
from .session import MergeSession
from .synth import write_synthetic
from .writer import SafetensorsWriter

PASS, FAIL, SKIP, INFO = "PASS", "FAIL", "SKIP", "INFO"
REPORT_FORMAT = "dare-merge-selftest/1"
#: SDXL's largest keys: the UNet's 10240x1280 feed-forward projections and the 49408x1280 token embedding.
TRIM_SHAPES = ((10240, 1280), (49408, 1280))
TRIM_KEEP = (0.1, 0.45, 0.9)     # k: ranks among the non-zero magnitudes and among the DARE-dropped zeros
N_MODELS = 3
SAMPLE_EVERY = 8     # quick mode: every 8th key (plus the integer and inpainting keys)
# Targets of issue 17 for a full-size merge on a GPU.
FLOOR_RATIO_TARGET = 1.3
CELL_TARGET_S = {"sd1": 0.3, "sd2": 0.3, "sdxl": 1.0}
# Recipes that run every step of each method (trim, DARE drop, both merge modes).
METHOD_KNOBS = {
    "weighted_sum": {"alpha": 0.7},
    "add_difference": {"p": 0.3, "alpha": 0.8},
    "ties": {"k": 0.3},
    "ties_soup": {"k": 0.6},
    "dare_ties": {"p": 0.3, "k": 0.5},
    "dare_ties_soup": {"p": 0.5, "k": 0.7, "merge": "sum"},
    "slerp": {"alpha": 0.35},
}

#: Methods the identity checks run (None: every registered method).
CHECK_METHODS: tuple[str, ...] | None = None

ProgressFn = Callable[[int, int, str], None]


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str
    detail: str = ""
    figures: dict = field(default_factory=dict)
    seconds: float = 0.0


class _Skip(Exception):
    """Raised inside a check: SKIP with this reason."""


class _Info(Exception):
    """Raised inside a check: INFO (measured, no target applies); args = (detail, figures)."""


@dataclass
class _Inputs:
    folder: str
    base: str
    models: list[str]
    inpaint_base: str

    def recipe(self, method: str = "dare_ties_soup", models: int = N_MODELS, base: str | None = None,
               **knobs) -> MergeRecipe:
        chosen = self.models[:1] if METHODS[method].kind == "slerp" else self.models[:models]
        return MergeRecipe(method=method, base=base or self.base, models=chosen, **knobs)


def default_scale_down(device: str) -> int:
    """Divisor of the synthetic checkpoints' dimensions: small enough for a CPU to finish in ~2 minutes."""
    return 8 if torch.device(device).type == "cuda" else 16


# ----------------------------------------------------------------------------- helpers

def _sample(tasks: list) -> list:
    """Every ``SAMPLE_EVERY``-th key, and every key of a special kind (integer copies, the inpainting conv)."""
    return [t for i, t in enumerate(tasks) if i % SAMPLE_EVERY == 0 or not t.dtype.is_floating_point
            or t.key == INPAINT_KEY or t.channel_slice is not None]


def _merge(recipe: MergeRecipe, device: str, chunk: int | None = None, opener=None,
           workers: int | None = None, sample: bool = False) -> tuple[dict[str, torch.Tensor], MergePlan]:
    plan = MergePlan(recipe, "fp16", opener=opener or open_checkpoint)
    if sample:
        plan.tasks = _sample(plan.tasks)
    try:
        return dict(iter_merge(plan, device, chunk=chunk, own_memory=True, workers=workers)), plan
    finally:
        plan.close()


def _compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """Figures of a bit-identity comparison: keys compared, keys that differ, the first one and by how much."""
    differing, first, worst = 0, "", 0.0
    if a.keys() != b.keys():
        return {"keys": len(a), "differing": -1, "first": sorted(set(a) ^ set(b))[0], "max_abs_diff": None}
    for key in a:
        x, y = a[key], b[key]
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x.cpu(), y.cpu()):
            differing += 1
            first = first or key
            if x.shape == y.shape and x.is_floating_point():
                worst = max(worst, float((x.cpu().float() - y.cpu().float()).abs().max()))
    return {"keys": len(a), "differing": differing, "first": first, "max_abs_diff": worst}


def _identity_verdict(figures: dict, what: str) -> tuple[str, str]:
    if figures["differing"] == 0:
        return PASS, f"{figures['keys']} keys bit-identical ({what})"
    if figures["differing"] < 0:
        return FAIL, f"key sets differ ({what}), e.g. {figures['first']}"
    return FAIL, (f"{figures['differing']} of {figures['keys']} keys differ ({what}), first {figures['first']}, "
                  f"max |diff| {figures['max_abs_diff']:.3g}")


def _write_inpaint_variant(src: str, dst: str) -> str:
    """``src`` with a 9-channel UNet input conv (an inpainting model), for the channel-sliced merge path."""
    with open_checkpoint(src) as ckpt:
        tensors = {key: ckpt.tensor(key).clone() for key in ckpt.keys()}
    if INPAINT_KEY in tensors:
        conv = tensors[INPAINT_KEY]
        extra = torch.zeros((conv.shape[0], 5, *conv.shape[2:]), dtype=conv.dtype)
        tensors[INPAINT_KEY] = torch.cat([conv, extra], dim=1)
    entries = [(key, tuple(t.shape), t.dtype) for key, t in tensors.items()]
    with SafetensorsWriter(dst, entries, overwrite=True) as writer:
        for key, tensor in tensors.items():
            writer.write(key, tensor)
        writer.commit({"format": "pt", "synthetic": "selftest inpainting variant"})
    return dst


def _make_inputs(folder: str, arch: str, scale_down: int) -> _Inputs:
    base = write_synthetic(os.path.join(folder, f"selftest-{arch}-base.safetensors"), arch, "base", seed=0,
                           scale_down=scale_down)
    models = [write_synthetic(os.path.join(folder, f"selftest-{arch}-ft{seed}.safetensors"), arch, "finetune",
                              seed=seed, scale_down=scale_down, sparse_frac=0.02 if seed == 1 else 0.0)
              for seed in range(1, N_MODELS + 1)]
    inpaint = _write_inpaint_variant(base, os.path.join(folder, f"selftest-{arch}-inpaint-base.safetensors"))
    return _Inputs(folder, base, models, inpaint)


def _input_bytes(paths: list[str], merge_vae: bool = False) -> int:
    """Bytes of the keys a device-tier cache would hold (floating-point UNet/text-encoder keys)."""
    total = 0
    for path in paths:
        with open_checkpoint(path) as ckpt:
            for key in ckpt.keys():
                info = ckpt.info(key)
                if device_key(key, merge_vae, info.dtype):
                    total += info.nbytes
    return total


def _collect(device: str) -> None:
    gc.collect()
    synchronize(device)
    empty_cache(device)


# ----------------------------------------------------------------------------- the checks

class _SelfTest:
    def __init__(self, device: str, arch: str, scale_down: int, progress: ProgressFn | None,
                 folder: str, trim_shapes: tuple[tuple[int, int], ...], quick: bool = False) -> None:
        self.quick = quick
        self.device = device
        self.cuda = torch.device(device).type == "cuda"
        self.arch = arch
        self.scale_down = scale_down
        self.progress = progress
        self.folder = folder
        self.trim_shapes = trim_shapes
        self.checks: list[Check] = []
        self.inputs: _Inputs | None = None
        self.reference: dict[str, dict[str, torch.Tensor]] = {}
        self._steps = 0
        self._total = 0

    # -- bookkeeping
    def _step(self, name: str) -> None:
        self._steps += 1
        if self.progress is not None:
            self.progress(self._steps, self._total, name)

    def run_check(self, name: str, fn: Callable[[], tuple[str, str, dict] | None]) -> Check:
        self._step(name)
        started = time.perf_counter()
        try:
            status, detail, figures = fn()
        except _Skip as exc:
            status, detail, figures = SKIP, str(exc), {}
        except _Info as exc:
            status, detail, figures = INFO, exc.args[0], exc.args[1]
        except Exception as exc:   # a check that crashes is a FAIL with its one line, never a traceback
            status, detail, figures = FAIL, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}", {}
        check = Check(name, status, detail, figures, round(time.perf_counter() - started, 3))
        self.checks.append(check)
        return check

    def skip_without_cuda(self) -> None:
        if not self.cuda:
            raise _Skip("no CUDA device (ran on the CPU); run with --device cuda on a GPU")

    # -- plan
    def run(self) -> list[Check]:
        methods = list(CHECK_METHODS or METHODS)
        self._total = 1 + 2 * len(methods) + len(self.trim_shapes) + 5
        self.run_check("synthetic inputs", self.check_inputs)
        if self.inputs is None:
            return self.checks
        for method in methods:
            self.run_check(f"cpu chunks = cpu whole keys: {method}", lambda m=method: self.check_cpu_chunks(m))
            self.run_check(f"{self.device if self.cuda else 'cuda'} = cpu: {method}",
                           lambda m=method: self.check_device_identity(m))
        for shape in self.trim_shapes:
            self.run_check(f"trim threshold {shape[0]}x{shape[1]}", lambda s=shape: self.check_trim(s))
        self.run_check("merged tensors end on the CPU", self.check_locations)
        self.run_check("peak VRAM within the cache budget", self.check_vram_budget)
        self.run_check("cache frees its VRAM after drop", self.check_release)
        self.run_check("out of memory: cache dropped, merge retried on the CPU", self.check_oom)
        self.run_check("timings: merge vs I/O floor, cell re-merge from the cache", self.check_timings)
        return self.checks

    # -- inputs
    def check_inputs(self) -> tuple[str, str, dict]:
        self.inputs = _make_inputs(self.folder, self.arch, self.scale_down)
        paths = [self.inputs.base, *self.inputs.models]
        size = sum(os.path.getsize(p) for p in paths)
        return PASS, f"{self.arch} base + {N_MODELS} fine-tunes, dimensions / {self.scale_down}", {
            "files": len(paths), "mb_per_file": round(size / len(paths) / MB, 1), "scale_down": self.scale_down}

    def _reference(self, method: str) -> dict[str, torch.Tensor]:
        """The CPU merge at the engine's default chunking: the reference every other run must equal."""
        if method not in self.reference:
            self.reference[method] = _merge(self.inputs.recipe(method, **METHOD_KNOBS.get(method, {})), "cpu",
                                            sample=self.quick)[0]
        return self.reference[method]

    # -- identity
    def check_cpu_chunks(self, method: str) -> tuple[str, str, dict]:
        recipe = self.inputs.recipe(method, **METHOD_KNOBS.get(method, {}))
        reference = self._reference(method)
        with open_checkpoint(self.inputs.base) as ckpt:
            whole = max(info.numel for info in (ckpt.info(k) for k in ckpt.keys()))
        small = max(1021, whole // 3) | 1   # odd: the big keys span several chunks that end mid-way
        # one chunk holding the largest key whole (the plainest way to run the kernels), and small chunks
        for label, chunk in (("whole-key", whole), ("small", small)):
            state, _ = _merge(recipe, "cpu", chunk=chunk, sample=self.quick)
            figures = _compare(state, reference)
            figures["chunks"] = f"{chunk} ({label}) vs the default"
            status, detail = _identity_verdict(figures, f"{label} chunks vs default chunks")
            if status != PASS:
                return status, detail, figures
        return PASS, f"{figures['keys']} keys bit-identical (whole-key and {small}-element chunks vs " \
                     "default chunks)", figures

    def check_device_identity(self, method: str) -> tuple[str, str, dict]:
        self.skip_without_cuda()
        recipe = self.inputs.recipe(method, **METHOD_KNOBS.get(method, {}))
        state, plan = _merge(recipe, self.device, sample=self.quick)
        figures = _compare(state, self._reference(method))
        on_cpu = all(t.device.type == "cpu" for t in state.values())
        status, detail = _identity_verdict(figures, f"{plan.report.device} vs cpu")
        if not on_cpu:
            status, detail = FAIL, detail + "; some results are not on the CPU"
        return status, detail, figures

    # -- trim
    def check_trim(self, shape: tuple[int, int]) -> tuple[str, str, dict]:
        rows, cols = shape
        n = rows * cols
        gen = torch.Generator().manual_seed(rows * 7919 + cols)
        # a delta as the engine sees it: fp16 differences (many exact ties), half of it DARE-dropped to 0
        delta = torch.randn(n, generator=gen).mul_(1e-3).to(torch.float16).to(torch.float32)
        delta[torch.rand(n, generator=gen) < 0.5] = 0.0
        magnitudes = delta.abs()
        on_device = delta.to(self.device)
        sorted_dev = torch.sort(on_device.abs()).values if self.cuda else None
        results, bad = [], []
        for k in TRIM_KEEP:
            rank = kernels.trim_rank(n, k)
            got = float(kernels.trim_threshold(on_device, k))
            want = float(torch.kthvalue(magnitudes, rank).values)
            row = {"k": k, "rank": rank, "threshold": got, "kthvalue_cpu": want}
            if sorted_dev is not None:
                row["sort_device"] = float(sorted_dev[rank - 1])
            results.append(row)
            if got != want or row.get("sort_device", want) != want:
                bad.append(f"k={k}: {got!r} vs kthvalue {want!r}")
        del on_device, sorted_dev
        _collect(self.device)
        where = f"on {self.device}" + (", against torch.sort there and" if self.cuda else ",")
        if bad:
            return FAIL, f"threshold differs {where} torch.kthvalue on the CPU: " + "; ".join(bad), {"ranks": results}
        return PASS, f"exact at {len(TRIM_KEEP)} ranks ({n / 1e6:.1f} M elements) {where} torch.kthvalue", \
            {"ranks": results}

    # -- where results end up
    def check_locations(self) -> tuple[str, str, dict]:
        # an inpainting base: its input conv is merged on 4 of its 9 channels (the channel-sliced path); its
        # int64 position_ids are copied; add_difference with DARE: the kernels' reads, without the trim's cost
        recipes = {"inpainting base": self.inputs.recipe("add_difference", base=self.inputs.inpaint_base,
                                                         **METHOD_KNOBS["add_difference"])}
        budget_mb = _input_bytes([self.inputs.inpaint_base, self.inputs.base, *self.inputs.models]) * 2 / MB + 1
        cache = InputCache(self.device, device_budget_mb=budget_mb, ram_budget_mb=budget_mb)
        session = MergeSession(self.folder, device=self.device)
        elsewhere, served, compared = [], 0, 0
        try:
            for label, recipe in recipes.items():
                reference = _merge(recipe, "cpu")[0]
                cache.prepare_recipe(recipe)
                for _ in range(2):   # the first merge fills the cache, the second is served from it
                    with session_reads_from(session, cache):
                        result = session.merge(recipe, hot_load=False, inputs={})
                    elsewhere += [f"{label}: {k} on {t.device}" for k, t in result.state.items()
                                  if t.device.type != "cpu"]
                    figures = _compare(result.state, reference)
                    if figures["differing"]:
                        return FAIL, f"{label}: the merge through the cache differs from the CPU merge from disk, " \
                                     f"first {figures['first']}", figures
                    compared += figures["keys"]
                served = max(served, cache.stats().device_bytes)
        finally:
            cache.release()
        figures = {"keys_checked": compared, "device_tier_mb": round(served / MB, 1)}
        if elsewhere:
            return FAIL, f"{len(elsewhere)} results not on the CPU, e.g. {elsewhere[0]}", figures
        how = (f"with {served / MB:.0f} MB of inputs on {self.device}" if served
               else "the device tier is not used on a CPU merge")
        return PASS, f"all {compared} results on the CPU and equal to the merge from disk ({how}; " \
                     "copied int64 keys and an inpainting base included)", figures

    # -- VRAM
    def check_vram_budget(self) -> tuple[str, str, dict]:
        self.skip_without_cuda()
        index = cuda_index(self.device)
        recipe = self.inputs.recipe("dare_ties", **METHOD_KNOBS["dare_ties"])
        _collect(self.device)
        baseline = memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(index)
        _merge(recipe, self.device)
        uncached_peak = torch.cuda.max_memory_allocated(index) - baseline
        inputs = _input_bytes([recipe.base, *recipe.models])
        budget = inputs // 2
        cache = InputCache(self.device, device_budget_mb=budget / MB, ram_budget_mb=2 * inputs / MB)
        try:
            _collect(self.device)
            torch.cuda.reset_peak_memory_stats(index)
            for _ in range(2):
                cache.prepare_recipe(recipe)
                _merge(recipe, self.device, opener=cache.open)
            held = cache.stats().device_bytes
            cached_peak = torch.cuda.max_memory_allocated(index) - baseline
        finally:
            cache.release()
        slack = 4 * MB + budget // 100   # the allocator's 512-byte rounding of each cached tensor
        figures = {"budget_mb": round(budget / MB, 1), "cache_held_mb": round(held / MB, 1),
                   "peak_without_cache_mb": round(uncached_peak / MB, 1),
                   "peak_with_cache_mb": round(cached_peak / MB, 1)}
        if held == 0:
            return FAIL, "the cache kept nothing on the device", figures
        if held > budget:
            return FAIL, f"the cache holds {held / MB:.0f} MB on the device, over its {budget / MB:.0f} MB budget", \
                figures
        if cached_peak > uncached_peak + budget + slack:
            return FAIL, (f"peak VRAM {cached_peak / MB:.0f} MB exceeds the merge's own {uncached_peak / MB:.0f} MB "
                          f"plus the {budget / MB:.0f} MB budget"), figures
        return PASS, (f"cache {held / MB:.0f} MB within its {budget / MB:.0f} MB budget; peak {cached_peak / MB:.0f} "
                      f"MB <= merge {uncached_peak / MB:.0f} MB + budget"), figures

    def check_release(self) -> tuple[str, str, dict]:
        self.skip_without_cuda()
        recipe = self.inputs.recipe("ties", **METHOD_KNOBS["ties"])
        _collect(self.device)
        allocated0, reserved0 = memory_allocated(self.device), memory_reserved(self.device)
        budget = _input_bytes([recipe.base, *recipe.models]) * 2
        cache = InputCache(self.device, device_budget_mb=budget / MB, ram_budget_mb=budget / MB)
        cache.prepare_recipe(recipe)
        _merge(recipe, self.device, opener=cache.open)
        gc.collect()
        held = cache.stats().device_bytes
        allocated1, reserved1 = memory_allocated(self.device), memory_reserved(self.device)
        line = cache.release()
        gc.collect()
        allocated2, reserved2 = memory_allocated(self.device), memory_reserved(self.device)
        figures = {"cache_held_mb": round(held / MB, 1), "allocated_mb": [round(x / MB, 1) for x in
                                                                         (allocated0, allocated1, allocated2)],
                   "reserved_mb": [round(x / MB, 1) for x in (reserved0, reserved1, reserved2)], "release": line}
        if held == 0:
            return FAIL, "the cache kept nothing on the device to free", figures
        if allocated2 > allocated0 + MB:
            return FAIL, f"{(allocated2 - allocated0) / MB:.0f} MB still allocated after release()", figures
        if reserved2 > reserved0 + 2 * MB:
            return FAIL, f"torch still reserves {(reserved2 - reserved0) / MB:.0f} MB more than before " \
                         "(empty_cache on the wrong device?)", figures
        return PASS, f"{held / MB:.0f} MB cached, all of it returned to the driver after release()", figures

    def check_oom(self) -> tuple[str, str, dict]:
        self.skip_without_cuda()
        index = cuda_index(self.device)
        recipe = self.inputs.recipe("dare_ties", **METHOD_KNOBS["dare_ties"])
        reference = self._reference("dare_ties")
        big = _input_bytes([recipe.base, *recipe.models]) * 2 / MB
        _collect(self.device)
        total = torch.cuda.get_device_properties(index).total_memory
        # room for a few small tensors above what torch holds now: the first chunk workspace cannot fit
        fraction = min(1.0, (memory_reserved(self.device) + 4 * MB) / total)
        figures: dict = {"memory_fraction": fraction}
        fill_cache = InputCache(self.device, device_budget_mb=big, ram_budget_mb=big)
        cache = InputCache(self.device, device_budget_mb=big, ram_budget_mb=big)
        session = MergeSession(self.folder, device=self.device)
        torch.cuda.set_per_process_memory_fraction(fraction, index)
        try:
            fill_cache.prepare_recipe(recipe)   # fill a cache directly: the device tier must overflow and go
            for path in [recipe.base, *recipe.models]:
                ckpt = fill_cache.open(path)
                for key in ckpt.keys():
                    if device_key(key, False, ckpt.info(key).dtype):
                        ckpt.flat(key)
            fill_stats = fill_cache.stats()
            cache.prepare_recipe(recipe)
            with session_reads_from(session, cache):
                result = session.merge(recipe, hot_load=False, inputs={})
        except OUT_OF_MEMORY_ERRORS as exc:
            return FAIL, f"out of memory escaped: {str(exc).splitlines()[0][:200]}", figures
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, index)
            fill_cache.release()
            cache.release()
        notes = [n for n in result.report.notes if "out of memory" in n]
        figures.update({"fill_notice": fill_stats.notice, "fill_device_mb": round(fill_stats.device_bytes / MB, 1),
                        "merged_on": result.report.device, "note": notes[0] if notes else ""})
        same = _compare(result.state, reference)
        if not fill_stats.notice or fill_stats.device_bytes:
            return FAIL, "filling the cache past the memory limit did not drop its device tier with a notice", \
                figures
        if result.report.device != "cpu" or not notes:
            return FAIL, f"the merge ran on {result.report.device} without an out-of-memory retry note", figures
        if same["differing"]:
            return FAIL, f"the CPU retry differs from the CPU reference, first {same['first']}", figures
        return PASS, "cache fill: device tier dropped with a notice; merge: retried on the CPU, bit-identical", \
            figures

    # -- timings
    def check_timings(self) -> tuple[str, str, dict]:
        from safetensors import safe_open
        recipe = self.inputs.recipe("dare_ties_soup")
        paths = [recipe.base, *recipe.models]
        _collect(self.device)
        started = time.perf_counter()
        nbytes = 0
        for path in paths:   # the I/O floor: every input byte out of the page cache (and onto the GPU)
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    if self.cuda:
                        t = t.to(self.device)
                    nbytes += t.numel() * t.element_size()
                    del t
        synchronize(self.device)
        floor_s = time.perf_counter() - started
        started = time.perf_counter()
        _merge(recipe, self.device)
        synchronize(self.device)
        merge_s = time.perf_counter() - started
        budget = _input_bytes(paths) * 2 / MB
        cache = InputCache(self.device, device_budget_mb=budget if self.cuda else 0, ram_budget_mb=budget)
        try:
            cache.prepare_recipe(recipe)
            _merge(recipe, self.device, opener=cache.open)
            cell = self.inputs.recipe("dare_ties_soup", alpha=0.8, p=0.4)
            started = time.perf_counter()
            _merge(cell, self.device, opener=cache.open)
            synchronize(self.device)
            cell_s = time.perf_counter() - started
        finally:
            cache.release()
        ratio = merge_s / floor_s if floor_s > 0 else float("inf")
        target = CELL_TARGET_S.get(self.arch, 1.0)
        figures = {"input_mb": round(nbytes / MB, 1), "io_floor_s": round(floor_s, 3), "merge_s": round(merge_s, 3),
                   "merge_over_floor": round(ratio, 2), "cell_remerge_s": round(cell_s, 3),
                   "targets": f"merge <= {FLOOR_RATIO_TARGET}x floor, cell <= {target} s (full size, GPU)"}
        detail = (f"merge {merge_s:.2f} s = {ratio:.1f}x the I/O floor ({floor_s:.2f} s for {nbytes / MB:.0f} MB); "
                  f"cell re-merge from the cache {cell_s:.2f} s")
        if not self.cuda or self.scale_down != 1:
            why = "on the CPU" if not self.cuda else f"at dimensions / {self.scale_down}"
            raise _Info(detail + f" (targets are for full-size GPU merges; measured {why})", figures)
        if ratio > FLOOR_RATIO_TARGET or cell_s > target:
            return FAIL, detail + f"; targets {FLOOR_RATIO_TARGET}x and {target} s", figures
        return PASS, detail, figures


# ----------------------------------------------------------------------------- entry points

def run_selftest(device: str = "auto", arch: str = "sd1", progress: ProgressFn | None = None,
                 scale_down: int | None = None, workdir: str | None = None,
                 trim_shapes: tuple[tuple[int, int], ...] | None = None, quick: bool = False) -> dict:
    """Run every check on ``device`` and return the report (see the module doc).

    ``device``: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N"; a
    device the kernels are not tested on (mps, xpu) runs on the CPU and the
    report says so.  ``progress(step, total, check name)`` is called before
    each check.  ``trim_shapes`` replaces SDXL's key shapes (tests use small
    ones).  ``quick``: the identity checks merge every 8th key only (plus
    the integer and inpainting keys), about 5x faster.  The synthetic inputs live in a temporary folder inside
    ``workdir`` (default: the system's) and are deleted afterwards.
    """
    if arch not in ("sd1", "sd2", "sdxl"):
        raise MergeError(f"unknown architecture {arch!r}; use sd1, sd2 or sdxl")
    target = resolve_merge_device(device)
    if str(device).startswith("cuda") and not target.is_cuda:
        raise MergeError(f"{device} is not usable here ({target.note.split(': ', 1)[-1]}; torch "
                         f"{describe_torch()}); run the self-test with --device cpu")
    scale = default_scale_down(target.device) if scale_down is None else scale_down
    if scale < 1:
        raise MergeError(f"--scale-down must be at least 1, got {scale}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dare-merge-selftest-", dir=workdir) as folder:
        test = _SelfTest(target.device, arch, scale, progress, folder, tuple(trim_shapes or TRIM_SHAPES), quick)
        checks = test.run()
        del test
    _collect(target.device)
    counts = {status: sum(c.status == status for c in checks) for status in (PASS, FAIL, SKIP, INFO)}
    return {
        "format": REPORT_FORMAT,
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": describe_torch(),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "lib_merge": _version(),
        "device": target.device,
        "device_name": accelerator_name(target.device),
        "device_note": target.note,
        "cuda_available": cuda_ready(),
        "arch": arch,
        "scale_down": scale,
        "quick": quick,
        "checks": [asdict(c) for c in checks],
        "counts": counts,
        "ok": counts[FAIL] == 0,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _version() -> str:
    from . import __version__
    return __version__


def format_report(report: dict) -> str:
    """The report as text to paste into a bug report (one line per check, figures indented)."""
    lines = ["DARE merge self-test " + ("passed" if report.get("ok") else "FAILED"),
             f"torch {report['torch']}, Python {report['python']}, {report['platform']}, lib_merge {report['lib_merge']}",
             f"device: {report['device']} ({report['device_name']}); arch {report['arch']}, synthetic dimensions "
             f"/ {report['scale_down']}{', quick (a sample of keys)' if report.get('quick') else ''}; "
             f"{report['seconds']} s"]
    if report.get("device_note"):
        lines.append(f"note: {report['device_note']}")
    lines.append("")
    for check in report["checks"]:
        lines.append(f"[{check['status']}] {check['name']}: {check['detail']} ({check['seconds']:.1f} s)")
        figures = {k: v for k, v in check.get("figures", {}).items() if k not in ("first",) or v}
        if figures and (check["status"] != PASS or check["name"].startswith(("trim", "timings", "peak", "cache",
                                                                               "out of memory", "merged"))):
            lines.append("       " + json.dumps(figures, sort_keys=True, default=str))
    counts = report["counts"]
    lines += ["", f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped, {counts[INFO]} info"]
    return "\n".join(lines)


def write_report_json(report: dict, path: str) -> str:
    """Write the report as JSON (atomically: a half-written report is worse than none); returns the path."""
    full = os.path.abspath(path)
    tmp = f"{full}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, full)
    return full


def main_selftest(device: str, arch: str, json_path: str | None, scale_down: int | None = None,
                  quiet: bool = False, quick: bool = False) -> int:
    """The CLI's ``selftest``: progress on stderr, the report on stdout and in ``json_path``; 1 if a check failed."""
    def progress(step: int, total: int, name: str) -> None:
        if not quiet:
            print(f"[{step}/{total}] {name}", file=sys.stderr, flush=True)

    report = run_selftest(device, arch, progress, scale_down, quick=quick)
    print(format_report(report))
    path = write_report_json(report, json_path or "dare-merge-selftest.json")
    print(f"\nreport written to {path}")
    return 0 if report["ok"] else 1


__all__ = ["run_selftest", "format_report", "write_report_json", "main_selftest", "Check", "PASS", "FAIL", "SKIP",
           "INFO", "TRIM_SHAPES", "default_scale_down"]
