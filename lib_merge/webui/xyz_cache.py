"""The X/Y/Z grid's merge input cache: one process-wide :class:`~lib_merge.input_cache.InputCache`.

A grid re-merges the same base and models with other knobs, so the WebUI
keeps their tensors in memory between cells (see :mod:`lib_merge.input_cache`
for the tiers).  This module owns the WebUI side of it: the budgets, read
from Settings > DARE Merge each time a cell asks for the cache (changing a
setting reconfigures, which drops what no longer fits), and dropping it on
demand (the section's button, the ``/dare-merge/v1/xyz/drop-cache`` route,
a script reload).  The WebUI's ``modules`` are reached only through
:mod:`.host`, inside functions.

VRAM belongs to the WebUI, so the GPU tier is held only while a grid runs:

- its budget "auto" (-1) is 0 under ``--lowvram``/``--medvram`` (the UNet is
  on the CPU while it is measured, and it needs the room when it comes up)
  and on Forge (its memory manager owns the VRAM), else the VRAM free on the
  merge device when the grid starts (:func:`grid_started`) minus
  :func:`reserve_mb` for sampling and decoding.  Outside a grid it is 0;
- after the grid (:func:`grid_finished`) and on any out-of-memory error
  (:func:`release_vram`, registered with ``host.on_free_vram``) the cache is
  dropped and torch's cached blocks of the cache's own device go back to
  the driver; after an out-of-memory error the rest of the grid keeps its
  inputs in RAM only.
"""
from __future__ import annotations

import threading

from ..input_cache import MB, InputCache
from . import host

OPT_CACHE_GPU_MB = "dare_merge_cache_gpu_mb"

RESERVE_MB = 3072            # VRAM always left to generation when the budget is measured
RESERVE_FRACTION = 0.25      # ... or this share of the card, whichever is more

_cache_lock = threading.RLock()
_cache: InputCache | None = None
_grid_gpu_mb: float | None = None     # the auto budget measured when the running grid started
_in_grid = False
_oom_in_grid = False


def reserve_mb(total_bytes: int) -> float:
    """VRAM the auto budget leaves free for generation on a card of ``total_bytes``."""
    return max(RESERVE_MB, RESERVE_FRACTION * total_bytes / MB)


def auto_budget_mb(free_bytes: int | None, total_bytes: int | None, low_vram: bool, forge: bool) -> float:
    """The auto ("-1") GPU budget from a measurement: none where generation needs the room or the
    host manages VRAM itself, else what is free beyond :func:`reserve_mb`."""
    if low_vram or forge or free_bytes is None or total_bytes is None:
        return 0.0
    return max(0.0, free_bytes / MB - reserve_mb(total_bytes))


def setting_mb() -> float:
    """The "Merge input cache on the GPU (MB)" setting; -1 is auto."""
    try:
        return float(host.setting(OPT_CACHE_GPU_MB, -1))
    except (TypeError, ValueError):
        return -1.0


def measure_auto_budget_mb(device: str) -> float:
    """:func:`auto_budget_mb` for ``device`` now (``mem_get_info`` of its own index)."""
    from ..compat import mem_get_info
    if not str(device).startswith("cuda"):
        return 0.0
    info = mem_get_info(device)
    free, total = info if info is not None else (None, None)
    return auto_budget_mb(free, total, host.low_vram_mode(), host.detect() == host.FORGE)


def gpu_budget_mb(device: str) -> float:
    """The device budget for a cell now: 0 off CUDA, outside a grid and after an out-of-memory error
    in this grid; the setting when it is >= 0; else the auto budget measured when the grid started."""
    if not str(device).startswith("cuda") or not _in_grid or _oom_in_grid:
        return 0
    value = setting_mb()
    if value >= 0:
        return value
    return _grid_gpu_mb or 0.0


def grid_started() -> None:
    """An X/Y/Z plot begins: measure the auto budget once for the whole grid (the model is loaded now)."""
    global _grid_gpu_mb, _in_grid, _oom_in_grid
    _in_grid, _oom_in_grid, _grid_gpu_mb = True, False, 0.0
    try:
        if setting_mb() < 0:
            _grid_gpu_mb = measure_auto_budget_mb(host.merge_device())
    except Exception as exc:  # never keep a grid from running
        print(f"[DARE Merge] could not measure free VRAM; no merge inputs on the GPU: {exc}", flush=True)


def grid_finished() -> None:
    """The plot is over: give the GPU tier back (the RAM tier stays when nothing was on the GPU)."""
    global _grid_gpu_mb, _in_grid, _oom_in_grid
    _in_grid, _oom_in_grid, _grid_gpu_mb = False, False, None
    release_vram()


def holds_vram() -> bool:
    """Whether the cache may hold device memory now (a device budget, or device-tier tensors)."""
    with _cache_lock:
        if _cache is None or _cache.device.type == "cpu":
            return False
        return _cache.device_budget > 0 or _cache.stats().device_bytes > 0


def release_vram() -> None:
    """Drop the cache if it may hold VRAM, and empty torch's cache on the cache's own device."""
    from ..compat import empty_cache
    with _cache_lock:
        if _cache is None or _cache.device.type == "cpu":
            return
        device = _cache.device
        if holds_vram():
            _cache.drop()
    empty_cache(device)


def on_out_of_memory() -> None:
    """Registered with ``host.on_free_vram``: an allocation failed somewhere (merge, cache fill,
    hot-load); give the VRAM back, and keep the rest of this grid's inputs in RAM only."""
    global _oom_in_grid
    if _in_grid:
        _oom_in_grid = True
    release_vram()


host.on_free_vram(on_out_of_memory)


def input_cache() -> InputCache:
    """The process-wide cache, configured from the current settings (changing them drops it)."""
    global _cache
    device = host.merge_device()
    with _cache_lock:
        if _cache is None:
            _cache = InputCache(device)
        _cache.configure(device, gpu_budget_mb(device), host.cache_budget_mb())
        return _cache


def drop_cache() -> str:
    """Free every cached input (the section's button, the HTTP route, a script reload)."""
    from ..compat import empty_cache
    with _cache_lock:
        if _cache is None:
            return "input cache dropped"
        _cache.drop()
        device = _cache.device
    empty_cache(device)
    return "input cache dropped"


def vram_status() -> dict:
    """Why the GPU tier has the budget it has (the X/Y/Z status route): the merge device, the
    setting, whether the host saves VRAM (lowvram/medvram) or manages it (Forge), the grid's budget."""
    chosen = host.merge_device_info()
    return {"merge_device": chosen.device, "device_note": chosen.note, "setting_mb": setting_mb(),
            "low_vram": host.low_vram_mode(), "host": host.detect(), "in_grid": _in_grid,
            "grid_budget_mb": None if _grid_gpu_mb is None else round(_grid_gpu_mb, 1)}


def cache_stats() -> dict | None:
    """The cache's figures for the status route; None before the first grid cell used it."""
    with _cache_lock:
        return _cache.stats().as_dict() if _cache is not None else None


__all__ = ["OPT_CACHE_GPU_MB", "gpu_budget_mb", "auto_budget_mb", "reserve_mb", "measure_auto_budget_mb",
           "grid_started", "grid_finished", "release_vram", "on_out_of_memory", "holds_vram", "input_cache",
           "drop_cache", "cache_stats", "vram_status"]
