"""Lazy, validated reading of checkpoints.

safetensors files are parsed here and checked as the format says: one JSON
object, no duplicate keys, every tensor's dtype, shape and offsets valid, and
the data offsets tiling the data exactly (no overlap, no gap, nothing after
the last tensor), so a hostile header is one line naming the file and key.
``.ckpt``/``.pt`` pickles are only ever opened with
``torch.load(weights_only=True)``, which refuses pickles that would run code.

Tensors are read with ``pread`` into fresh memory, one key at a time, not
through a memory map: a file truncated while it is merged (rewritten in place,
``truncate -s``) makes a mapped read die of SIGBUS, which would kill the CLI
or the whole WebUI with no message.  A short read or a changed size is
instead a :class:`CheckpointError` naming the file and key.  (Windows cannot
truncate a mapped file, so there the memory map stays.)
"""
from __future__ import annotations

import json
import mmap
import os
import pickle
import re
import struct
import sys
from dataclasses import dataclass
from typing import Iterator, Sequence

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
_GAP_READ = 64 * 1024   # bytes of other tensors one read of several may span (Checkpoint.tensors)
_MAX_INT_DIGITS = 100           # valid ones fit in 64 bits; up to here the entry check names the key
_INT64_MAX = (1 << 63) - 1
USE_MMAP = sys.platform == "win32"   # see the module docstring


class _HeaderError(ValueError):
    """A header that is well-formed JSON in no sense the format allows (raised while parsing)."""


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise _HeaderError(f"holds a {len(text.lstrip('-'))}-digit integer")
    return int(text)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)   # built in C: a header has one object per tensor, tens of thousands in a LoRA
    if len(out) != len(pairs):
        seen: set = set()
        for key, _ in pairs:
            if key in seen:
                raise _HeaderError(f"holds the key {key[:200]!r} twice")
            seen.add(key)
    return out


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read at ``offset`` into ``view``; the number of bytes read (0 at the end of the file)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, min(len(view), 1 << 30), offset)   # older macOS: no preadv
    view[:len(data)] = data
    return len(data)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
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

    #: True when :meth:`read_range` reads just that range from the file (cheap per chunk); False when
    #: it slices :meth:`flat`, which a caller should then call once per key instead.
    ranged_reads = False

    def read_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of a tensor's flat view, in its stored dtype."""
        return self.flat(key)[start:stop]

    def prefetch(self, key: str) -> None:
        """Hint that ``key`` is read next (no-op unless the data lives in a file)."""

    def tensor(self, key: str) -> torch.Tensor:
        info = self._infos[key]
        return self.flat(key).view(info.shape)

    def tensors(self, keys: Sequence[str], float32: bool = False) -> list[torch.Tensor]:
        """Several tensors at once (a LoRA module's factors): one read where the file keeps them together.

        ``float32``: floating-point ones come back as float32 (converted together where they can be).
        """
        out = [self.tensor(key) for key in keys]
        return [t.float() if float32 and t.is_floating_point() else t for t in out]

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
        header = self._parse_header(raw)
        self._data_start = 8 + header_len
        data_len = size - self._data_start
        meta = header.pop("__metadata__", None)
        if meta is None:
            meta = {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise CheckpointError("corrupt safetensors header: __metadata__ must map names to text", path)
        self.metadata = dict(meta)
        self._offsets: dict[str, int] = {}
        spans: list[tuple[int, int, str]] = []
        for key, entry in header.items():
            spans.append(self._parse_entry(key, entry, data_len))
        self._check_tiling(spans, data_len)
        self._size = size
        self._file = open(path, "rb")
        st = os.fstat(self._file.fileno())
        self._mtime = st.st_mtime_ns
        if st.st_size != size:
            self._file.close()
            raise CheckpointError(f"the file changed while it was being opened (now {st.st_size} bytes, was "
                                  f"{size})", path)
        self._mmap = (mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
                      if USE_MMAP and size > 0 else None)

    def _parse_header(self, raw: bytes) -> dict:
        if not raw.startswith(b"{"):   # the format: the header MUST begin with {
            raise CheckpointError("corrupt safetensors header (not a JSON object)", self.path)
        try:
            # the digit-count check per integer only where the bytes hold a run of that many digits at all
            long_int = re.search(rb"[0-9]{%d}" % (_MAX_INT_DIGITS + 1), raw) is not None
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                                parse_int=_parse_int if long_int else None)
        except _HeaderError as exc:
            raise CheckpointError(f"corrupt safetensors header: it {exc}", self.path) from None
        except RecursionError:
            raise CheckpointError("corrupt safetensors header (JSON nested too deeply)", self.path) from None
        except ValueError as exc:   # JSONDecodeError, UnicodeDecodeError
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise CheckpointError(f"corrupt safetensors header (not valid JSON: {first})", self.path) from None
        if not isinstance(header, dict):
            raise CheckpointError("corrupt safetensors header (not a JSON object)", self.path)
        return header

    def _parse_entry(self, key: str, entry: object, data_len: int) -> tuple[int, int, str]:
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise CheckpointError("corrupt safetensors header entry", self.path, key)
        name = entry["dtype"]
        dtype = SAFETENSORS_DTYPES.get(name) if isinstance(name, str) else None
        if dtype is None:
            raise CheckpointError(f"unsupported dtype {str(name)[:40]!r}", self.path, key)
        shape, offsets = entry["shape"], entry["data_offsets"]
        if (not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) and o >= 0 for o in offsets)):
            raise CheckpointError("corrupt safetensors header entry (shape/offsets)", self.path, key)
        elements = 1
        for d in shape:
            elements *= max(d, 1)
        if elements > _INT64_MAX:
            shown = str(shape) if len(str(shape)) <= 80 else str(shape)[:77] + "..."
            raise CheckpointError(f"shape {shown} is too large (over 2**63 elements or a dimension beyond "
                                  "2**63)", self.path, key)
        info = TensorInfo(tuple(shape), dtype)
        start, end = offsets
        if not start <= end <= data_len:
            raise CheckpointError(
                f"data offsets [{start}, {end}) lie outside the file's {data_len} data bytes "
                f"(truncated or corrupt file)", self.path, key)
        if end - start != info.nbytes:
            raise CheckpointError(
                f"data offsets span {end - start} bytes but {name}{list(shape)} needs "
                f"{info.nbytes}", self.path, key)
        self._infos[key] = info
        self._offsets[key] = self._data_start + start
        return start, end, key

    def _check_tiling(self, spans: list[tuple[int, int, str]], data_len: int) -> None:
        """The tensors' bytes must tile the data exactly, as the format requires (no polyglot files)."""
        expected, previous = 0, None
        for start, end, key in sorted(spans):
            if start < expected:
                raise CheckpointError(f"data offsets [{start}, {end}) overlap those of key {previous}",
                                      self.path, key)
            if start > expected:
                raise CheckpointError(f"data offsets [{start}, {end}) leave {start - expected} bytes before them "
                                      "that belong to no tensor (misaligned offsets)", self.path, key)
            expected, previous = end, key
        if expected != data_len:
            raise CheckpointError(f"{data_len - expected} bytes after the last tensor belong to no tensor "
                                  "(corrupt file, or data appended to it)", self.path)

    def _check_unchanged(self, key: str) -> None:
        """Size and mtime as when opened: a file rewritten in place, even to the same size, is refused."""
        try:
            st = os.fstat(self._file.fileno())
        except (OSError, AttributeError, ValueError) as exc:
            raise CheckpointError(f"cannot read any more ({exc}); nothing was saved", self.path, key) from None
        if st.st_size != self._size:
            raise CheckpointError(f"the file changed while it was being read (now {st.st_size} bytes, was "
                                  f"{self._size}); nothing was saved", self.path, key)
        if st.st_mtime_ns != self._mtime:
            raise CheckpointError("the file changed while it was being read (it was written to since it was "
                                  "opened); nothing was saved", self.path, key)

    @property
    def ranged_reads(self) -> bool:  # type: ignore[override]
        return self._mmap is None

    def flat(self, key: str) -> torch.Tensor:
        info = self._infos[key]
        if info.numel == 0:
            return torch.empty(0, dtype=info.dtype)
        if self._mmap is not None:
            return torch.frombuffer(self._mmap, dtype=info.dtype, count=info.numel,
                                    offset=self._offsets[key])
        return self._read(key, 0, info.numel)

    def read_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Read just elements ``[start, stop)``: a merge holds one chunk of each input, not whole tensors."""
        if self._mmap is not None:
            return self.flat(key)[start:stop]
        info = self._infos[key]
        start, stop = max(0, start), min(stop, info.numel)
        return self._read(key, start, max(start, stop))

    def tensors(self, keys: Sequence[str], float32: bool = False) -> list[torch.Tensor]:
        """Several tensors at once: one pread of the bytes they span when they lie close together.

        A LoRA's module is two or three small tensors stored side by side; read
        one by one, a bake of 10 SDXL LoRAs made 40 000 reads and as many
        conversions, a fifth of its time.  With ``float32``, tensors of one
        floating dtype at aligned offsets are converted by one op over the span.
        """
        infos = [self._infos[key] for key in keys]
        if self._mmap is not None or len(keys) < 2:
            return super().tensors(keys, float32)
        starts = [self._offsets[key] for key in keys]
        lo, hi = min(starts), max(s + i.nbytes for s, i in zip(starts, infos))
        if hi - lo > 2 * sum(i.nbytes for i in infos) + _GAP_READ:
            return super().tensors(keys, float32)
        raw = torch.empty(hi - lo, dtype=torch.uint8)
        self._pread(keys[0], raw, lo)
        dtypes = {i.dtype for i in infos}
        size = infos[0].dtype.itemsize
        if (float32 and len(dtypes) == 1 and infos[0].dtype.is_floating_point and (hi - lo) % size == 0
                and all((s - lo) % size == 0 for s in starts)):
            whole = raw.view(infos[0].dtype).float()
            return [whole[(s - lo) // size:(s - lo) // size + i.numel].view(i.shape) for s, i in zip(starts, infos)]
        out = []
        for start, info in zip(starts, infos):
            part = raw[start - lo:start - lo + info.nbytes]
            if (start - lo) % info.dtype.itemsize == 0:   # views of the one buffer where aligned
                tensor = part.view(info.dtype).view(info.shape)
            else:   # the format allows unaligned offsets: a copy
                tensor = torch.empty(info.numel, dtype=info.dtype)
                tensor.view(torch.uint8).copy_(part)
                tensor = tensor.view(info.shape)
            out.append(tensor.float() if float32 and tensor.is_floating_point() else tensor)
        return out

    def _read(self, key: str, start: int, stop: int) -> torch.Tensor:
        dtype = self._infos[key].dtype
        out = torch.empty(stop - start, dtype=dtype)
        if stop == start:
            return out
        self._pread(key, out.view(torch.uint8), self._offsets[key] + start * dtype.itemsize)
        return out

    def _pread(self, key: str, out: torch.Tensor, offset: int) -> None:
        """Fill the uint8 tensor ``out`` from the file's bytes at ``offset`` (``key``: for messages)."""
        if self._file is None:
            raise CheckpointError("read after the file was closed", self.path, key)
        self._check_unchanged(key)
        view = memoryview(out.numpy())
        fd, done = self._file.fileno(), 0
        while done < len(view):
            try:
                got = _pread_into(fd, view[done:], offset + done)
            except OSError as exc:
                raise CheckpointError(f"read failed: {exc.strerror or exc}; nothing was saved",
                                      self.path, key) from None
            if got == 0:
                self._check_unchanged(key)
                raise CheckpointError("the file ended early while it was being read (truncated while merging?); "
                                      "nothing was saved", self.path, key)
            done += got

    def prefetch(self, key: str) -> None:
        """Ask the kernel to start reading a tensor's pages (asynchronous readahead).

        The merge of the current key then overlaps the disk reads of the next
        one; with a warm page cache this costs nothing.
        """
        info = self._infos[key]
        start = self._offsets[key]
        if self._mmap is None:
            if self._file is not None and info.nbytes and hasattr(os, "posix_fadvise"):
                try:
                    os.posix_fadvise(self._file.fileno(), start, info.nbytes, os.POSIX_FADV_WILLNEED)
                except (OSError, ValueError):
                    pass
            return
        if not hasattr(mmap, "MADV_WILLNEED"):
            return
        aligned = start - start % mmap.PAGESIZE
        length = start + info.nbytes - aligned
        if length > 0:
            try:
                self._mmap.madvise(mmap.MADV_WILLNEED, aligned, length)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        # Views handed out (Windows) keep the mapping alive; closing it under them would crash,
        # so leave the mmap to the garbage collector and close only the descriptor.
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None


class PickleCheckpoint(Checkpoint):
    """A .ckpt/.pt loaded with weights_only=True (tensors only, no code)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._size = os.path.getsize(path)
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
        # torch.load(mmap=True) maps the file: a truncation would be SIGBUS on the next page read.
        # Loading pickles whole instead would cost their full size in RAM each, so the size is
        # checked before each key: it narrows the window (safetensors files close it, see above).
        try:
            size = os.path.getsize(self.path)
        except OSError:
            size = -1
        if size != self._size:
            raise CheckpointError(f"the file changed while it was being read (now {max(size, 0)} bytes, was "
                                  f"{self._size}); nothing was saved", self.path, key)
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
