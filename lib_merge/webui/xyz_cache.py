"""The X/Y/Z grid's merge input cache: one process-wide :class:`~lib_merge.input_cache.InputCache`.

A grid re-merges the same base and models with other knobs, so the WebUI
keeps their tensors in memory between cells (see :mod:`lib_merge.input_cache`
for the tiers).  This module owns the WebUI side of it: the budgets, read
from Settings > DARE Merge each time a cell asks for the cache (changing a
setting reconfigures, which drops what no longer fits), and dropping it on
demand (the section's button, the ``/dare-merge/v1/xyz/drop-cache`` route,
a script reload).  The WebUI's ``modules`` are reached only through
:mod:`.host`, inside functions.
"""
from __future__ import annotations

import threading

from ..input_cache import MB, InputCache
from . import host

OPT_CACHE_GPU_MB = "dare_merge_cache_gpu_mb"

_cache_lock = threading.Lock()
_cache: InputCache | None = None
_auto_gpu_mb: float | None = None


def gpu_budget_mb(device: str) -> float:
    """The device budget: the setting, where -1 means half the GPU memory free at first use."""
    global _auto_gpu_mb
    if not str(device).startswith("cuda"):
        return 0
    try:
        value = float(host.setting(OPT_CACHE_GPU_MB, -1))
    except (TypeError, ValueError):
        value = -1
    if value >= 0:
        return value
    if _auto_gpu_mb is None:
        import torch
        free, _total = torch.cuda.mem_get_info()
        _auto_gpu_mb = free / 2 / MB
    return _auto_gpu_mb


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
    with _cache_lock:
        if _cache is not None:
            _cache.drop()
    return "input cache dropped"


def cache_stats() -> dict | None:
    """The cache's figures for the status route; None before the first grid cell used it."""
    with _cache_lock:
        return _cache.stats().as_dict() if _cache is not None else None


__all__ = ["OPT_CACHE_GPU_MB", "gpu_budget_mb", "input_cache", "drop_cache", "cache_stats"]
