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
2. RAM within ``ram_budget_mb`` (pinned when the device is CUDA, so the copy
   up is a fast DMA): every other key, and what the device tier had no room for;
3. nowhere: the key is streamed from the file's memory map as without a cache.

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
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from .arch import TEXT_ENCODER, UNET, VAE, component_of
from .checkpoint import Checkpoint, open_checkpoint
from .hashing import legacy_hash, sha256_file, short_hash

MB = 1 << 20
DEVICE_TIER = "device"
RAM_TIER = "ram"


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

    def as_dict(self) -> dict:
        return {"device": self.device, "files": self.files,
                "device_mb": round(self.device_bytes / MB, 1), "ram_mb": round(self.ram_bytes / MB, 1),
                "device_budget_mb": self.device_budget // MB, "ram_budget_mb": self.ram_budget // MB,
                "hits": self.hits, "misses": self.misses, "streamed_mb": round(self.streamed_bytes / MB, 1)}

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


def device_key(key: str, merge_vae: bool) -> bool:
    """Whether the kernels read this key (and so it belongs on the device): UNet/TE, VAE if merged."""
    component = component_of(key)
    return component in (UNET, TEXT_ENCODER) or (merge_vae and component == VAE)


class InputCache:
    """Per-file tensor cache across merges, within a device and a RAM budget (see the module doc)."""

    def __init__(self, device: str | torch.device = "cpu", device_budget_mb: float = 0,
                 ram_budget_mb: float = 0, opener: Callable[[str], Checkpoint] = open_checkpoint,
                 pin_memory: bool | None = None) -> None:
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._opener = opener
        self._pin = pin_memory
        self._merge_vae = False
        self._device_full = False
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
            new_device = torch.device(device) if device is not None else self.device
            if new_device.type == "cuda" and new_device.index is None and torch.cuda.is_available():
                new_device = torch.device("cuda", torch.cuda.current_device())
            new_dev_budget = int(device_budget_mb * MB) if device_budget_mb is not None else self.device_budget
            new_ram_budget = int(ram_budget_mb * MB) if ram_budget_mb is not None else self.ram_budget
            if new_device.type == "cpu":
                new_dev_budget = 0  # on a CPU merge, RAM is the device: one budget, the RAM one
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
        if (self.device.type != "cpu" and not self._device_full and device_key(key, self._merge_vae)
                and self.used[DEVICE_TIER] + nbytes <= self.device_budget):
            try:
                kept = source.to(self.device, copy=True)
            except (torch.OutOfMemoryError, RuntimeError, AssertionError):  # OOM, or a torch without CUDA
                self._device_full = True  # the WebUI's model needs the room more; RAM from here on
            else:
                return self._store(entry, key, kept, DEVICE_TIER, nbytes)
        if self.used[RAM_TIER] + nbytes <= self.ram_budget:
            kept = torch.empty(source.shape, dtype=source.dtype, pin_memory=self._pinned())
            kept.copy_(source)
            return self._store(entry, key, kept, RAM_TIER, nbytes)
        return None

    def _pinned(self) -> bool:
        if self._pin is not None:
            return self._pin
        return self.device.type == "cuda" and torch.cuda.is_available()

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
        self._device_full = False

    def drop(self) -> None:
        """Forget every cached input and close the files (the "drop cache" button)."""
        with self._lock:
            for real in list(self._entries):
                self._drop_entry(real)
            self.used = {DEVICE_TIER: 0, RAM_TIER: 0}
            self._device_full = False
            self.hits = self.misses = self.streamed_bytes = 0
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()

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
                              self.device_budget, self.ram_budget, self.hits, self.misses, self.streamed_bytes)


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
    try:
        yield
    finally:
        session.opener = previous


__all__ = ["InputCache", "CachedCheckpoint", "CacheStats", "session_reads_from", "device_key", "MB"]
