"""Lazy, validated reading of checkpoints.

safetensors files are parsed here (header checked against the file size, every
offset range checked) and memory-mapped copy-on-write, so a tensor is a
zero-copy view whose pages the kernel can drop again: reading N models costs
page cache, not anonymous memory.  ``.ckpt``/``.pt`` pickles are only ever
opened with ``torch.load(weights_only=True)``, which refuses pickles that would
run code.
"""
from __future__ import annotations

import json
import mmap
import os
import pickle
import struct
from dataclasses import dataclass
from typing import Iterator

import torch

from .arch import ARCH_NAMES, component_of, detect_arch
from .errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class Checkpoint:
    """A read-only checkpoint: key metadata up front, tensors on demand."""

    path: str
    metadata: dict[str, str]

    def __init__(self, path: str) -> None:
        self.path = path
        self.metadata = {}
        self._infos: dict[str, TensorInfo] = {}

    # -- metadata
    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, key: str) -> bool:
        return key in self._infos

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self._infos.items()}

    @property
    def arch(self) -> str | None:
        return detect_arch(self.shapes())

    @property
    def file_size(self) -> int:
        return os.path.getsize(self.path)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    # -- data
    def flat(self, key: str) -> torch.Tensor:
        """1-D view of a tensor's elements in its stored dtype (zero-copy where possible)."""
        raise NotImplementedError

    def prefetch(self, key: str) -> None:
        """Hint that ``key`` is read next (no-op unless the data lives in a file)."""

    def tensor(self, key: str) -> torch.Tensor:
        info = self._infos[key]
        return self.flat(key).view(info.shape)

    def close(self) -> None:
        pass

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def summary(self) -> dict:
        """What `inspect` prints: architecture, components, dtypes, key counts."""
        components: dict[str, dict] = {}
        for key, info in self._infos.items():
            comp = components.setdefault(component_of(key), {"keys": 0, "params": 0, "dtypes": {}})
            comp["keys"] += 1
            comp["params"] += info.numel
            name = DTYPE_NAMES.get(info.dtype, str(info.dtype))
            comp["dtypes"][name] = comp["dtypes"].get(name, 0) + 1
        arch = self.arch
        return {"file": self.path, "size_bytes": self.file_size,
                "architecture": ARCH_NAMES.get(arch, "unknown") if arch else "unknown",
                "keys": len(self._infos), "components": components}


class SafetensorsCheckpoint(Checkpoint):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        try:
            size = os.path.getsize(path)
        except OSError as exc:
            raise CheckpointError(f"cannot read: {exc.strerror}", path) from exc
        if size < 8:
            raise CheckpointError(f"not a safetensors file: only {size} bytes", path)
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > min(size - 8, _MAX_HEADER):
                raise CheckpointError(
                    f"corrupt or truncated safetensors: header length {header_len} "
                    f"runs past the end of the {size}-byte file", path)
            raw = handle.read(header_len)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"corrupt safetensors header (not valid JSON: {exc})", path) from exc
        if not isinstance(header, dict):
            raise CheckpointError("corrupt safetensors header (not a JSON object)", path)
        self._data_start = 8 + header_len
        data_len = size - self._data_start
        meta = header.pop("__metadata__", None) or {}
        self.metadata = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
        self._offsets: dict[str, int] = {}
        for key, entry in header.items():
            self._parse_entry(key, entry, data_len)
        self._file = open(path, "rb")
        self._mmap = (mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
                      if size > 0 else None)

    def _parse_entry(self, key: str, entry: object, data_len: int) -> None:
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise CheckpointError("corrupt safetensors header entry", self.path, key)
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"unsupported dtype {entry['dtype']!r}", self.path, key)
        shape, offsets = entry["shape"], entry["data_offsets"]
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)):
            raise CheckpointError("corrupt safetensors header entry (shape/offsets)", self.path, key)
        info = TensorInfo(tuple(shape), dtype)
        start, end = offsets
        if not 0 <= start <= end <= data_len:
            raise CheckpointError(
                f"data offsets [{start}, {end}) lie outside the file's {data_len} data bytes "
                f"(truncated or corrupt file)", self.path, key)
        if end - start != info.nbytes:
            raise CheckpointError(
                f"data offsets span {end - start} bytes but {entry['dtype']}{list(shape)} needs "
                f"{info.nbytes}", self.path, key)
        self._infos[key] = info
        self._offsets[key] = self._data_start + start

    def flat(self, key: str) -> torch.Tensor:
        info = self._infos[key]
        if info.numel == 0:
            return torch.empty(0, dtype=info.dtype)
        return torch.frombuffer(self._mmap, dtype=info.dtype, count=info.numel,
                                offset=self._offsets[key])

    def prefetch(self, key: str) -> None:
        """Ask the kernel to start reading a tensor's pages (asynchronous readahead).

        The merge of the current key then overlaps the disk reads of the next
        one; with a warm page cache this costs nothing.
        """
        if self._mmap is None or not hasattr(mmap, "MADV_WILLNEED"):
            return
        info = self._infos[key]
        start = self._offsets[key]
        aligned = start - start % mmap.PAGESIZE
        length = start + info.nbytes - aligned
        if length > 0:
            try:
                self._mmap.madvise(mmap.MADV_WILLNEED, aligned, length)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        # Views handed out keep the mapping alive; closing it under them would crash,
        # so leave the mmap to the garbage collector and close only the descriptor.
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None


class PickleCheckpoint(Checkpoint):
    """A .ckpt/.pt loaded with weights_only=True (tensors only, no code)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc) and "zip" not in str(exc):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                "refused: this pickle holds objects other than tensors (it could run code); "
                f"only weights_only loading is allowed ({str(exc).splitlines()[0][:200]})", path) from exc
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read as a PyTorch checkpoint: {str(exc).splitlines()[0][:200]}",
                                  path) from exc
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError("not a checkpoint: the pickle holds no state dict", path)
        self._tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        for key, tensor in self._tensors.items():
            self._infos[key] = TensorInfo(tuple(tensor.shape), tensor.dtype)

    def flat(self, key: str) -> torch.Tensor:
        return self._tensors[key].reshape(-1)


def open_checkpoint(path: str) -> Checkpoint:
    """Open a checkpoint lazily, with a clear error naming the file on any problem."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError("no such file", path)
    if os.path.isdir(path):
        raise CheckpointError("is a directory, not a checkpoint file", path)
    if path.lower().endswith(PICKLE_SUFFIXES):
        ckpt: Checkpoint = PickleCheckpoint(path)
    else:
        ckpt = SafetensorsCheckpoint(path)
    if not ckpt.keys():
        raise CheckpointError("holds no tensors", path)
    return ckpt


def iter_chunks(total: int, chunk: int) -> Iterator[tuple[int, int]]:
    """(start, stop) element ranges covering [0, total)."""
    for start in range(0, total, chunk):
        yield start, min(total, start + chunk)
