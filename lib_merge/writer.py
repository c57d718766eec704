"""Atomic, streaming safetensors output.

Tensors are written one at a time as the merge produces them, into a hidden
temporary file beside the target; the file only takes its name once complete
and fsynced, so a crash, a cancel or a full disk never leaves a half-written
checkpoint, and an existing file is never replaced unless asked.  The header
is reserved up front and rewritten at the end, so metadata known only after
the merge (input hashes, timings) still goes in it.

The temporary file is named ``.<name>.dare-merge-<pid>.part`` and holds an
advisory lock while it is written, so a merge killed outright (SIGKILL, the
OOM killer) leaves a file that the next merge into that folder recognises as
stale (its process is gone and nobody holds the lock) and removes, saying so.
An output that is one of the merge's inputs (by real path or inode, through
symlinks or hard links), or that is not a regular file (/dev/null, a FIFO),
is refused even with ``overwrite``.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
import struct
import threading
from typing import Callable, Iterable, Sequence

import torch

from .checkpoint import DTYPE_NAMES
from .errors import OutputError

OUTPUT_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_METADATA_RESERVE = 64 * 1024
WRITE_BEHIND_BYTES = 256 << 20   # outputs from this size are flushed to disk while they are written
WRITE_BEHIND_SECONDS = 1.0
TEMP_MARK = ".dare-merge-"
_TEMP_RE = re.compile(r"^\..+\.dare-merge-(\d+)(?:\.\d+)?\.part$")
_LIVE_TEMPS: set[str] = set()        # temporary files this process is writing now
_LIVE_LOCK = threading.Lock()
log = logging.getLogger("lib_merge")
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


def check_output_target(path: str, protected_paths: Iterable[str] = (),
                        what: str = "which this merge reads or which is loaded now") -> None:
    """Refuse an output that is not a regular file, or that is one of ``protected_paths``.

    ``overwrite`` replaces a name, so an output that resolves to an input
    (same real path, or same inode through a hard link or a symlinked folder)
    would destroy that input, and one that names a device or FIFO would
    replace it with a regular file (``/dev/null``): both are refused always.
    """
    try:
        st = os.stat(path)   # follows symlinks: a link to /dev/null is /dev/null
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputError(f"cannot check the output path: {exc.strerror or exc}", path) from exc
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a character device" if stat.S_ISCHR(st.st_mode)
                else "a block device" if stat.S_ISBLK(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise OutputError(f"is {kind}, not a regular file; refusing to replace it (even with overwrite)", path)
    real = os.path.realpath(path)
    for other in protected_paths:
        if not other:
            continue
        same = os.path.realpath(other) == real
        if not same and st is not None:
            try:
                other_st = os.stat(other)
                same = (other_st.st_dev, other_st.st_ino) == (st.st_dev, st.st_ino)
            except OSError:
                pass
        if same:
            raise OutputError(f"is the same file as {other}, {what}; refusing to write over it, "
                              "even with overwrite; choose another name", path)


def create_error(exc: OSError, folder: str) -> OutputError:
    """The user's message for a temporary file that cannot be created in the output folder."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError("the disk is full; nothing was saved", folder)
    return OutputError(f"cannot write in the output folder: {exc.strerror or exc}; nothing was saved", folder)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True   # exists, owned by someone else
    return True


def _unlink_if_unlocked(path: str) -> bool:
    """Delete ``path`` unless a live writer holds its lock (or, on Windows, keeps it open)."""
    try:
        import fcntl
    except ImportError:   # Windows: a file another process has open cannot be deleted
        try:
            os.unlink(path)
            return True
        except OSError:
            return False
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False   # a writer (maybe in another PID namespace) still has it
        try:
            os.unlink(path)
            return True
        except OSError:
            return False
    finally:
        os.close(fd)


def remove_stale_temps(folder: str) -> str | None:
    """Delete temporary files left in ``folder`` by merges that were killed; one line saying so, or None."""
    removed, total = [], 0
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    for name in names:
        match = _TEMP_RE.match(name)
        if not match:
            continue
        pid = int(match.group(1))
        path = os.path.join(folder, name)
        if pid == os.getpid():
            with _LIVE_LOCK:
                if path in _LIVE_TEMPS:
                    continue
        elif os.name != "nt" and _pid_alive(pid):
            continue
        try:
            size = os.path.getsize(path)
        except OSError:
            continue
        if _unlink_if_unlocked(path):
            removed.append(name)
            total += size
    if not removed:
        return None
    shown = ", ".join(removed[:3]) + (f" and {len(removed) - 3} more" if len(removed) > 3 else "")
    return (f"removed {len(removed)} stale temporary file{'s' if len(removed) > 1 else ''} "
            f"({_size(total)}) left in {folder} by merges that were killed: {shown}")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _create_temp(folder: str, name: str) -> tuple[int, str]:
    """Create and lock ``.<name>.dare-merge-<pid>.part`` (mode from the umask, as open() gives)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for attempt in range(1000):
        suffix = f".{attempt}" if attempt else ""
        path = os.path.join(folder, f".{name}{TEMP_MARK}{os.getpid()}{suffix}.part")
        with _LIVE_LOCK:
            if path in _LIVE_TEMPS:
                continue
            _LIVE_TEMPS.add(path)
        try:
            fd = os.open(path, flags, 0o666)
        except FileExistsError:
            _forget_temp(path)
            continue
        except OSError:
            _forget_temp(path)
            raise
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (ImportError, OSError):
            pass   # no flock (Windows, some network file systems): the PID check alone applies
        return fd, path
    raise OutputError("too many temporary files of this process in the output folder", folder)


def _forget_temp(path: str) -> None:
    with _LIVE_LOCK:
        _LIVE_TEMPS.discard(path)


def remove_live_temps() -> list[str]:
    """Delete the temporary files this process created and no writer finished or aborted; returns them.

    An interrupt (SIGTERM, Ctrl-C) can land between a temporary file's creation and
    its writer taking charge of it; no ``abort`` then knows the file.  The CLI calls
    this once the merge has ended by that interrupt, when no writer is left.
    """
    with _LIVE_LOCK:
        paths = sorted(_LIVE_TEMPS)
        _LIVE_TEMPS.clear()
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return paths


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
                 overwrite: bool = False, metadata_reserve: int = _METADATA_RESERVE,
                 protected_paths: Iterable[str] = (), notify: Callable[[str], None] | None = None) -> None:
        """``protected_paths``: files the output must never be (the inputs, the checkpoint loaded now).

        ``notify`` receives one line when stale temporary files of killed
        merges were removed from the folder (default: a warning in the log).
        """
        self.path = os.path.abspath(path)
        self.overwrite = overwrite
        self._tmp: str | None = None
        self._file = None
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            raise OutputError("the output folder does not exist", folder)
        if os.path.isdir(self.path):
            raise OutputError("is a directory", self.path)
        check_output_target(self.path, protected_paths)
        if os.path.lexists(self.path) and not overwrite:
            raise OutputError("exists already; choose another name or allow overwriting", self.path)
        stale = remove_stale_temps(folder)
        if stale:
            (notify or log.warning)(stale)
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
        try:
            fd, self._tmp = _create_temp(folder, os.path.basename(self.path))
        except OSError as exc:
            raise create_error(exc, folder) from exc
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
        _forget_temp(self._tmp)
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
        if self._tmp:
            _forget_temp(self._tmp)
        self._tmp = None

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
