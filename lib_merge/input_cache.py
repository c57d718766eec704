"""Keep the merge inputs in memory between X/Y/Z cells, so a cell costs kernel time, not disk reads.

A grid re-merges the same base and models with other knobs.  Read from disk,
every cell pays the file I/O (page faults on fresh memory maps, or real reads
once the page cache is gone) and, on a GPU, the host-to-device copy of every
input byte.  :class:`InputCache` keeps each input tensor, as stored (fp16
stays fp16: no precision is lost and nothing is recomputed), in the first
tier with room:

1. the merge device (``cuda``) within ``device_budget_mb``, for the tensors
   the kernels read (UNet and text-encoder weights; the VAE too when the
   recipe merges it): the engine's per-chunk ``.to(device)`` is then a no-op;
2. RAM within ``ram_budget_mb``, pageable: every other key, and what the
   device tier had no room for.  Not pinned: torch's pinned allocator rounds
   each allocation up to a power of two and keeps freed blocks locked, so a
   "4 GB" budget could lock ~8 GB of RAM for good, and the engine's copies
   are synchronous, so pinning would buy little;
3. nowhere: the key is streamed from the file's memory map as without a cache.

Only floating-point keys the kernels read go to the device; integer keys
(``position_ids``) stay in RAM, so a key the merge copies comes back on the
CPU like every merged key.  VRAM belongs to the WebUI: the device tier is
sized per grid by :func:`default_device_budget_mb` (0 under low/medium VRAM
modes), handed back with :meth:`InputCache.release` (or
:meth:`InputCache.release_device_tier`) after a grid, and dropped at once,
with ``empty_cache()`` on the cache's own device and a :attr:`notice` saying
what to do, when filling it runs out of memory; the inputs are then kept in
RAM instead.

Tensors are cached on first use, during the first merge (which therefore
reads the disk once, as it would anyway) and are served from memory from the
second merge on.  Inputs (rather than their deltas) are kept because the
engine computes each delta in float32 per chunk on the device, which is
cheap there; an fp16 delta would lose bits the merge must not lose.

:meth:`InputCache.open` returns a :class:`CachedCheckpoint`, a
:class:`~lib_merge.checkpoint.Checkpoint` whose ``flat`` answers from memory,
so the existing engine merges from the cache unchanged: ``MergePlan(...,
opener=cache.open)``, or :func:`session_reads_from` for a ``MergeSession``.
Entries are dropped when the chosen inputs change (:meth:`prepare`), when a
file changes on disk (size or mtime), when the budgets change, or on demand
(:meth:`drop`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from .arch import TEXT_ENCODER, UNET, VAE, component_of
from .checkpoint import Checkpoint, open_checkpoint
from .compat import cuda_ready, empty_cache, is_out_of_memory, mem_get_info, with_index
from .hashing import legacy_hash, sha256_file, short_hash

MB = 1 << 20
DEVICE_TIER = "device"
RAM_TIER = "ram"
LOG = logging.getLogger("lib_merge.input_cache")


@dataclass
class _Entry:
    """One input file: its open source and the tensors kept from it."""

    real: str
    stamp: tuple[int, int]
    source: Checkpoint
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    tiers: dict[str, str] = field(default_factory=dict)
    hashes: dict | None = None


@dataclass
class CacheStats:
    """What the cache holds and how it served the last merges (for the status line and tests)."""

    device: str
    files: int
    device_bytes: int
    ram_bytes: int
    device_budget: int
    ram_budget: int
    hits: int
    misses: int
    streamed_bytes: int
    notice: str = ""

    def as_dict(self) -> dict:
        return {"device": self.device, "files": self.files,
                "device_mb": round(self.device_bytes / MB, 1), "ram_mb": round(self.ram_bytes / MB, 1),
                "device_budget_mb": self.device_budget // MB, "ram_budget_mb": self.ram_budget // MB,
                "hits": self.hits, "misses": self.misses, "streamed_mb": round(self.streamed_bytes / MB, 1),
                "notice": self.notice}

    def summary(self) -> str:
        where = [f"{self.ram_bytes / MB:.0f} MB in RAM"]
        if self.device_bytes:
            where.insert(0, f"{self.device_bytes / MB:.0f} MB on {self.device}")
        return f"input cache: {self.files} files, " + ", ".join(where)


class CachedCheckpoint(Checkpoint):
    """A checkpoint served from an :class:`InputCache` (same interface as the file it stands for).

    ``close`` is a no-op: the cache owns the file and its tensors, and
    ``MergePlan.close`` must not take them away from the next cell.
    """

    def __init__(self, path: str, entry: _Entry, cache: "InputCache") -> None:
        super().__init__(path)
        self.metadata = entry.source.metadata
        self._infos = entry.source._infos  # shared, read-only: every key's shape and dtype
        self._entry = entry
        self._cache = cache

    @property
    def file_size(self) -> int:
        return self._entry.stamp[0]

    def flat(self, key: str) -> torch.Tensor:
        return self._cache._flat(self._entry, key)

    def prefetch(self, key: str) -> None:
        """Readahead only for what still comes from the file."""
        if key not in self._entry.tensors:
            prefetch = getattr(self._entry.source, "prefetch", None)
            if prefetch is not None:
                prefetch(key)

    def close(self) -> None:
        pass


def _stamp(real: str) -> tuple[int, int]:
    st = os.stat(real)
    return st.st_size, st.st_mtime_ns


def device_key(key: str, merge_vae: bool, dtype: torch.dtype | None = None) -> bool:
    """Whether the kernels read this key (and so it belongs on the device): UNet/TE, VAE if merged.

    With ``dtype``: only floating-point keys; integer ones (``position_ids``)
    are copied, never merged, and a copy must come back on the CPU.
    """
    if dtype is not None and not dtype.is_floating_point:
        return False
    component = component_of(key)
    return component in (UNET, TEXT_ENCODER) or (merge_vae and component == VAE)


def default_device_budget_mb(device: str | torch.device, reserve_mb: float = 2048, lowvram: bool = False,
                             held_mb: float = 0) -> float:
    """A device-tier budget that leaves the WebUI what generation needs, measured now (call per grid).

    0 for a non-CUDA device and under ``lowvram`` (A1111's ``--lowvram``/
    ``--medvram``, Forge's memory manager: the model moves on and off the GPU,
    so free VRAM measured between steps is not free).  Otherwise half of what
    the driver reports free on that device (its index kept) after
    ``reserve_mb`` for sampling, plus ``held_mb`` the cache already holds
    there (it would be freed before refilling).
    """
    if lowvram or torch.device(device).type != "cuda":
        return 0.0
    info = mem_get_info(device)
    if info is None:
        return 0.0
    free_mb = info[0] / MB + max(0.0, held_mb)
    return max(0.0, (free_mb - max(0.0, reserve_mb)) / 2)


class InputCache:
    """Per-file tensor cache across merges, within a device and a RAM budget (see the module doc)."""

    def __init__(self, device: str | torch.device = "cpu", device_budget_mb: float = 0,
                 ram_budget_mb: float = 0, opener: Callable[[str], Checkpoint] = open_checkpoint) -> None:
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._opener = opener
        self._merge_vae = False
        self._device_full = False
        self._ram_full = False
        self.notice = ""  # the last out-of-memory event, one line with advice (for the status line)
        self.device = torch.device(device)
        self.device_budget = 0
        self.ram_budget = 0
        self.used = {DEVICE_TIER: 0, RAM_TIER: 0}
        self.hits = self.misses = self.streamed_bytes = 0
        self.configure(device, device_budget_mb, ram_budget_mb)

    # -- settings
    def configure(self, device: str | torch.device | None = None, device_budget_mb: float | None = None,
                  ram_budget_mb: float | None = None) -> None:
        """Change the device or budgets; what was cached under other settings is dropped."""
        with self._lock:
            new_device = with_index(device) if device is not None else self.device
            new_dev_budget = int(device_budget_mb * MB) if device_budget_mb is not None else self.device_budget
            new_ram_budget = int(ram_budget_mb * MB) if ram_budget_mb is not None else self.ram_budget
            if new_device.type != "cuda":
                # on a CPU merge, RAM is the device: one budget, the RAM one; mps/xpu merge on the CPU too
                new_dev_budget = 0
            if (new_device, new_dev_budget, new_ram_budget) != (self.device, self.device_budget, self.ram_budget):
                self._drop_tensors()
            self.device, self.device_budget, self.ram_budget = new_device, max(0, new_dev_budget), max(0, new_ram_budget)

    @property
    def enabled(self) -> bool:
        return self.device_budget > 0 or self.ram_budget > 0

    # -- what to keep
    def prepare(self, base: str, models: Iterable[str], merge_vae: bool = False) -> None:
        """Say which inputs the next merges use: entries for other files (or changed files) are dropped."""
        wanted = {os.path.realpath(p) for p in [base, *models]}
        with self._lock:
            self._merge_vae = merge_vae
            for real in list(self._entries):
                entry = self._entries[real]
                if real not in wanted or not os.path.exists(real) or _stamp(real) != entry.stamp:
                    self._drop_entry(real)

    def prepare_recipe(self, recipe) -> None:
        """:meth:`prepare` from a :class:`~lib_merge.recipe.MergeRecipe`."""
        self.prepare(recipe.base, recipe.models, merge_vae=getattr(recipe, "vae", "base") == "merge")

    def open(self, path: str) -> Checkpoint:
        """A Checkpoint for ``path`` served from the cache (use in place of ``open_checkpoint``)."""
        real = os.path.realpath(os.fspath(path))
        with self._lock:
            entry = self._entries.get(real)
            if entry is not None and (not os.path.exists(real) or _stamp(real) != entry.stamp):
                self._drop_entry(real)
                entry = None
            if entry is None:
                source = self._opener(path)  # validates, raises CheckpointError naming the file
                entry = _Entry(real, _stamp(real), source)
                self._entries[real] = entry
            return CachedCheckpoint(os.fspath(path), entry, self)

    def input_hashes(self, base: str, models: Iterable[str]) -> dict[str, dict]:
        """``lib_merge.api.input_hashes`` for these inputs, computed once per file version."""
        out: dict[str, dict] = {}
        for path in [base, *models]:
            full = os.path.abspath(path)
            if full in out:
                continue
            entry = self._entries.get(os.path.realpath(path))
            if entry is not None and entry.hashes is not None and _stamp(entry.real) == entry.stamp:
                out[full] = entry.hashes
                continue
            sha = sha256_file(full)
            info = {"sha256": sha, "hash": short_hash(sha), "legacy_hash": legacy_hash(full)}
            if entry is not None:
                entry.hashes = info
            out[full] = info
        return out

    # -- serving tensors
    def _flat(self, entry: _Entry, key: str) -> torch.Tensor:
        with self._lock:
            cached = entry.tensors.get(key)
            if cached is not None:
                self.hits += 1
                return cached
            self.misses += 1
            source = entry.source.flat(key)
            kept = self._keep(entry, key, source)
            if kept is None:
                self.streamed_bytes += source.numel() * source.element_size()
                return source
            return kept

    def _keep(self, entry: _Entry, key: str, source: torch.Tensor) -> torch.Tensor | None:
        nbytes = source.numel() * source.element_size()
        if nbytes == 0:
            return None
        if (self.device.type != "cpu" and not self._device_full
                and device_key(key, self._merge_vae, source.dtype)
                and self.used[DEVICE_TIER] + nbytes <= self.device_budget):
            try:
                kept = self._to_device(source)
            except Exception as exc:  # OOM, or a torch/driver without this device
                self._device_failed(exc)   # RAM from here on: the WebUI's model needs the room more
            else:
                return self._store(entry, key, kept, DEVICE_TIER, nbytes)
        if not self._ram_full and self.used[RAM_TIER] + nbytes <= self.ram_budget:
            try:
                kept = self._to_ram(source)
            except (MemoryError, RuntimeError) as exc:   # the RAM budget is more than the machine has
                if not is_out_of_memory(exc):
                    raise
                self._ram_full = True
                self._set_notice(f"input cache: out of RAM after {self.used[RAM_TIER] / MB:.0f} MB; the other "
                                 "inputs are read from disk (lower the RAM budget of the input cache)")
                return None
            return self._store(entry, key, kept, RAM_TIER, nbytes)
        return None

    def _to_ram(self, source: torch.Tensor) -> torch.Tensor:
        """A RAM copy of ``source`` in pageable memory, out of the file's memory map."""
        kept = torch.empty(source.shape, dtype=source.dtype)
        kept.copy_(source)
        return kept

    def _to_device(self, source: torch.Tensor) -> torch.Tensor:
        """A device copy of ``source`` (a method so tests can make it fail like a full GPU)."""
        return source.to(self.device, copy=True)

    def _device_failed(self, exc: BaseException) -> None:
        """The device tier could not take a tensor: stop using it; on OOM also give back what it holds."""
        self._device_full = True
        if not is_out_of_memory(exc):
            if cuda_ready(self.device):   # a real device that fails otherwise is worth a line in the log
                LOG.warning("input cache: cannot keep inputs on %s (%s); keeping them in RAM", self.device,
                            str(exc).splitlines()[0][:200])
            return
        held = self.used[DEVICE_TIER]
        self._drop_tier(DEVICE_TIER)
        empty_cache(self.device)
        self._set_notice(f"input cache: out of memory on {self.device} with {held / MB:.0f} MB of inputs cached "
                         "there; the GPU tier was dropped and inputs are kept in RAM instead (lower the GPU "
                         "budget of the input cache, or set it to 0 with --medvram/--lowvram)")

    def _set_notice(self, text: str) -> None:
        self.notice = text
        LOG.warning(text)

    def _drop_tier(self, tier: str) -> int:
        """Forget every tensor kept in ``tier``; the bytes it held."""
        freed = 0
        for entry in self._entries.values():
            for key in [k for k, t in entry.tiers.items() if t == tier]:
                tensor = entry.tensors.pop(key)
                del entry.tiers[key]
                freed += tensor.numel() * tensor.element_size()
        self.used[tier] = 0
        return freed

    def _store(self, entry: _Entry, key: str, tensor: torch.Tensor, tier: str, nbytes: int) -> torch.Tensor:
        entry.tensors[key] = tensor
        entry.tiers[key] = tier
        self.used[tier] += nbytes
        return tensor

    # -- dropping
    def _drop_entry(self, real: str) -> None:
        entry = self._entries.pop(real, None)
        if entry is None:
            return
        for key, tensor in entry.tensors.items():
            self.used[entry.tiers[key]] -= tensor.numel() * tensor.element_size()
        entry.tensors.clear()
        entry.tiers.clear()
        entry.source.close()

    def _drop_tensors(self) -> None:
        for entry in self._entries.values():
            entry.tensors.clear()
            entry.tiers.clear()
        self.used = {DEVICE_TIER: 0, RAM_TIER: 0}
        self._device_full = self._ram_full = False

    def drop(self) -> None:
        """Forget every cached input, close the files and give the device's freed memory back."""
        with self._lock:
            for real in list(self._entries):
                self._drop_entry(real)
            self.used = {DEVICE_TIER: 0, RAM_TIER: 0}
            self._device_full = self._ram_full = False
            self.hits = self.misses = self.streamed_bytes = 0
        empty_cache(self.device)   # on the cache's own device (its index kept), not the current one

    def release(self) -> str:
        """:meth:`drop` for callers that end a grid or handle an OOM; returns a line for the log."""
        with self._lock:
            device_mb, ram_mb = self.used[DEVICE_TIER] / MB, self.used[RAM_TIER] / MB
        self.drop()
        if not device_mb and not ram_mb:
            return "input cache: empty"
        where = f"{device_mb:.0f} MB on {self.device} and " if device_mb else ""
        return f"input cache: released {where}{ram_mb:.0f} MB of RAM"

    def out_of_memory(self) -> None:
        """A merge ran out of device memory: give the GPU tier back and stop refilling it.

        The RAM tier keeps serving.  The device tier stays off until the
        settings change (:meth:`configure`) or :meth:`drop`/:meth:`release`.
        """
        with self._lock:
            held = self._drop_tier(DEVICE_TIER)
            self._device_full = True
            if held:
                self._set_notice(f"input cache: {held / MB:.0f} MB on {self.device} given back after an "
                                 "out-of-memory merge; inputs are kept in RAM until the settings change")
        empty_cache(self.device)

    def release_device_tier(self) -> int:
        """Give back the device tier only (the RAM tier keeps serving); the bytes it held.

        For the end of a grid when the RAM tier may stay: generation gets all
        of its VRAM back, and the next grid refills the GPU from RAM, not disk.
        """
        with self._lock:
            freed = self._drop_tier(DEVICE_TIER)
            self._device_full = False
        if freed:
            empty_cache(self.device)
        return freed

    # -- introspection
    def cached_files(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def tier_of(self, path: str, key: str) -> str | None:
        """Where a key of a file is kept: "device", "ram", or None (streamed / not read yet)."""
        with self._lock:
            entry = self._entries.get(os.path.realpath(path))
            return None if entry is None else entry.tiers.get(key)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(str(self.device), len(self._entries), self.used[DEVICE_TIER], self.used[RAM_TIER],
                              self.device_budget, self.ram_budget, self.hits, self.misses, self.streamed_bytes,
                              self.notice)


# ----------------------------------------------------------------------------- session bridge

@contextlib.contextmanager
def session_reads_from(session, cache: InputCache | None) -> Iterator[None]:
    """Within this block, ``session``'s merges open their inputs through ``cache``.

    ``MergeSession.opener`` is swapped for the block only, so merges started
    from the tab or the HTTP route keep reading the files directly (and do not
    fill the cache).  In a WebUI the block runs inside a generation, which
    holds the queue lock every other merge waits for.
    """
    if cache is None or not cache.enabled:
        yield
        return
    previous = session.opener
    session.opener = cache.open
    hooks = getattr(session, "out_of_memory_hooks", None)
    if hooks is not None:
        hooks.append(cache.out_of_memory)
    try:
        yield
    finally:
        session.opener = previous
        if hooks is not None and cache.out_of_memory in hooks:
            hooks.remove(cache.out_of_memory)


__all__ = ["InputCache", "CachedCheckpoint", "CacheStats", "session_reads_from", "device_key",
           "default_device_budget_mb", "MB"]
