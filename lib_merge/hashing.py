"""File hashes as AUTOMATIC1111 shows them, with a persistent cache.

A1111 names a checkpoint by the first 10 hex digits of the file's sha256
("shorthash") and keeps full hashes in its cache.  Hashing a 7 GB SDXL file
takes seconds, so results are cached by (path, size, mtime) in
``$DARE_MERGE_CACHE`` (default ``~/.cache/sd-webui-dare-merge/hashes.json``),
the same idea as the WebUI's own ``cache.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading

_LOCK = threading.Lock()
_BLOCK = 1 << 22


def cache_path() -> str:
    root = os.environ.get("DARE_MERGE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "sd-webui-dare-merge")
    return os.path.join(root, "hashes.json")


def _load_cache() -> dict:
    try:
        with open(cache_path(), encoding="utf-8") as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(data: dict) -> None:
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs time


def sha256_file(path: str) -> str:
    """Full sha256 (hex) of a file, from the cache when size and mtime match."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    stamp = [stat.st_size, stat.st_mtime_ns]
    with _LOCK:
        entry = _load_cache().get(real)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = hashlib.sha256()
    block = bytearray(_BLOCK)   # one buffer for the whole file: no 4 MB allocation per read
    view = memoryview(block)
    with open(real, "rb", buffering=0) as handle:
        while count := handle.readinto(block):
            digest.update(view[:count])
    value = digest.hexdigest()
    with _LOCK:
        data = _load_cache()
        data[real] = {"stamp": stamp, "sha256": value}
        _save_cache(data)
    return value


def short_hash(sha256: str) -> str:
    """A1111's shorthash: the first 10 hex digits."""
    return sha256[:10]


def legacy_hash(path: str) -> str:
    """A1111's old 8-digit model hash (sha256 of 64 KiB at offset 1 MiB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        digest.update(handle.read(0x10000))
    return digest.hexdigest()[:8]
