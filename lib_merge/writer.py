"""Atomic, streaming safetensors output.

Tensors are written one at a time as the merge produces them, into a hidden
temporary file beside the target; the file only takes its name once complete
and fsynced, so a crash, a cancel or a full disk never leaves a half-written
checkpoint, and an existing file is never replaced unless asked.  The header
is reserved up front and rewritten at the end, so metadata known only after
the merge (input hashes, timings) still goes in it.
"""
from __future__ import annotations

import errno
import json
import os
import re
import struct
import tempfile
import threading
from typing import Sequence

import torch

from .checkpoint import DTYPE_NAMES
from .errors import OutputError

OUTPUT_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_METADATA_RESERVE = 64 * 1024
WRITE_BEHIND_BYTES = 256 << 20   # outputs from this size are flushed to disk while they are written
WRITE_BEHIND_SECONDS = 1.0
_RESERVED_NAMES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
                   *(f"lpt{i}" for i in range(1, 10))}


def check_output_name(name: str) -> str:
    """Refuse a file name that is a path, hidden, reserved or empty; add .safetensors."""
    stripped = name.strip()
    if not stripped:
        raise OutputError("the output name is empty")
    if "/" in stripped or "\\" in stripped or os.sep in stripped or stripped in (".", ".."):
        raise OutputError(f"the output name {name!r} must be a plain file name, without path separators")
    if stripped.startswith("."):
        raise OutputError(f"the output name {name!r} must not start with a dot")
    if re.search(r'[<>:"|?*\x00-\x1f]', stripped):
        raise OutputError(f"the output name {name!r} contains characters that are not allowed in file names")
    if stripped.split(".")[0].lower() in _RESERVED_NAMES:
        raise OutputError(f"the output name {name!r} is a reserved device name")
    if not stripped.lower().endswith(".safetensors"):
        stripped += ".safetensors"
    return stripped


def write_error(exc: OSError, path: str) -> OutputError:
    """The user's message for a failed write: a full disk says so."""
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return OutputError("the disk is full (or the file size limit was reached) while writing; "
                           "nothing was saved", path)
    return OutputError(f"write failed: {exc.strerror or exc}; nothing was saved", path)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write every byte of ``data`` at ``offset`` (os.pwrite may write less than asked).

    Windows has no os.pwrite; there the fd is private to one thread of one
    process, so seek + write is equivalent.
    """
    done = 0
    while done < len(data):
        if hasattr(os, "pwrite"):
            done += os.pwrite(fd, data[done:], offset + done)
        else:
            os.lseek(fd, offset + done, os.SEEK_SET)
            done += os.write(fd, data[done:])


def open_for_placing(path: str) -> int:
    """A write-only, binary fd on an existing file, for :func:`pwrite_all`."""
    return os.open(path, os.O_WRONLY | getattr(os, "O_BINARY", 0))


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.view(torch.uint8).numpy())


class _WriteBehind(threading.Thread):
    """Flush the file to disk every second while the merge is still computing.

    Linux only starts writing dirty pages back once they pass a tenth of free
    memory, so a multi-GB output otherwise reaches the disk in the final fsync
    (1.3 s for 2.1 GB here, ~4 s for an SDXL file) with every core idle.
    Errors are left to that final fsync, which reports them.
    """

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True, name="dare-merge-write-behind")
        self._fd = fd
        self._done = threading.Event()   # not _stop: Thread has a method of that name
        self._sync = getattr(os, "fdatasync", os.fsync)

    def run(self) -> None:
        while not self._done.wait(WRITE_BEHIND_SECONDS):
            try:
                self._sync(self._fd)
            except OSError:
                return

    def stop(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join()


class SafetensorsWriter:
    """Write tensors in a fixed order to ``path`` atomically.

    Use as a context manager: leaving it with an exception (including a
    cancel) deletes the temporary file; :meth:`commit` gives it its name.
    """

    def __init__(self, path: str, entries: Sequence[tuple[str, Sequence[int], torch.dtype]],
                 overwrite: bool = False, metadata_reserve: int = _METADATA_RESERVE) -> None:
        self.path = os.path.abspath(path)
        self.overwrite = overwrite
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            raise OutputError("the output folder does not exist", folder)
        if os.path.isdir(self.path):
            raise OutputError("is a directory", self.path)
        if os.path.exists(self.path) and not overwrite:
            raise OutputError("exists already; choose another name or allow overwriting", self.path)
        self._entries = list(entries)
        self._header, offset = {}, 0
        for key, shape, dtype in self._entries:
            n = 1
            for d in shape:
                n *= int(d)
            nbytes = n * dtype.itemsize
            self._header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": [int(d) for d in shape],
                                 "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self.data_bytes = offset
        body = json.dumps(self._header, separators=(",", ":"))
        self._header_len = len(body) + metadata_reserve
        self._header_len += (8 - (8 + self._header_len) % 8) % 8
        self._next = 0
        self._placed: set[int] = set()
        data_start = 8 + self._header_len
        self._offsets = [data_start + self._header[key]["data_offsets"][0] for key, _, _ in self._entries]
        fd, self._tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", suffix=".part", dir=folder)
        self._file = os.fdopen(fd, "wb")
        self._write_behind: _WriteBehind | None = None
        self._guard(lambda: self._file.write(b"\0" * (8 + self._header_len)))
        if self.data_bytes >= WRITE_BEHIND_BYTES:
            self._write_behind = _WriteBehind(fd)
            self._write_behind.start()

    def _stop_write_behind(self) -> None:
        if self._write_behind is not None:
            self._write_behind.stop()   # before the descriptor closes: it must not sync a reused one
            self._write_behind = None

    def _guard(self, action):
        try:
            return action()
        except OSError as exc:
            self.abort()
            raise write_error(exc, self.path) from exc

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append the next tensor (keys must come in the order given at creation)."""
        expected_key, shape, dtype = self._entries[self._next]
        if key != expected_key or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            self.abort()
            raise OutputError(f"internal: expected {expected_key} {tuple(shape)} {dtype}, got "
                              f"{key} {tuple(tensor.shape)} {tensor.dtype}", self.path, key)
        data = tensor_bytes(tensor)
        self._guard(lambda: self._file.write(data))
        self._next += 1

    @property
    def temp_path(self) -> str | None:
        """The hidden file being written (for worker processes that write into it)."""
        return self._tmp

    def file_offsets(self) -> list[int]:
        """Absolute file offset of every entry's bytes, in entry order."""
        return list(self._offsets)

    def mark_placed(self, index: int) -> None:
        """Record that entry ``index`` was written at its offset (by this process or a worker)."""
        self._placed.add(index)

    def commit(self, metadata: dict[str, str]) -> str:
        """Write the header with metadata, fsync and give the file its name."""
        written = len(self._placed) if self._placed else self._next
        if written != len(self._entries):
            self.abort()
            raise OutputError(f"internal: only {written} of {len(self._entries)} tensors written", self.path)
        header = dict(self._header)
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) > self._header_len:
            self.abort()
            raise OutputError("internal: metadata larger than the reserved header", self.path)
        raw += b" " * (self._header_len - len(raw))

        self._stop_write_behind()

        def finish():
            self._file.seek(0)
            self._file.write(struct.pack("<Q", self._header_len))
            self._file.write(raw)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

        self._guard(finish)
        try:
            if self.overwrite:
                os.replace(self._tmp, self.path)
            else:
                os.link(self._tmp, self.path)  # fails if the name was taken meanwhile: never clobbers
                os.unlink(self._tmp)
        except FileExistsError as exc:
            self.abort()
            raise OutputError("exists already (created while merging); nothing was overwritten",
                              self.path) from exc
        except OSError as exc:
            self.abort()
            raise OutputError(f"could not give the file its name: {exc.strerror or exc}", self.path) from exc
        self._tmp = None
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file (idempotent)."""
        self._stop_write_behind()
        try:
            if self._file and not self._file.closed:
                self._file.close()
        except OSError:
            pass
        if self._tmp and os.path.exists(self._tmp):
            try:
                os.unlink(self._tmp)
            except OSError:
                pass
        self._tmp = None

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
