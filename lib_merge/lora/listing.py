"""Which files of a Lora folder are LoRAs, how the tab names them, and back: plain values in, plain values out.

A WebUI host (``lib_merge.webui.host``) reads its settings (``--lora-dir``,
``models_path``) and hands them here; nothing in this module imports the
WebUI, so the listing is tested with real files and no WebUI.

- :func:`lora_folder_for`: the folder the WebUI's own Lora extension scans.
- :func:`lora_files_in`: the LoRAs in it, recognised by content (a LoRA's
  key names, :func:`.formats.keys_look_like_lora`), not by name: a checkpoint
  or a broken file dropped into the folder is not offered as a LoRA.  Only
  the header's names are read, and the answer is remembered per file size
  and modification time, so a refresh reads only new or changed files.
- :data:`LORA_MARK` + relative path is the title the tab and the HTTP API
  show ("LoRA: styles/ink.safetensors"); :func:`find_lora_in` turns a title
  (or the name without folder or suffix, as an infotext carries it) back into
  the file; :func:`resolve_pasted_names` does it for a pasted X/Y/Z infotext.
- :func:`base_choices`: a LoRA is never a base, so the base lists leave them out.
"""
from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..errors import CheckpointError

LORA_MARK = "LoRA: "
LORA_SUFFIXES = (".safetensors",)   # pickled LoRAs (.pt/.ckpt) are not opened just to list them
_MAX_HEADER = 100 * 1024 * 1024

_seen: dict[str, tuple[int, int, bool]] = {}   # path -> (size, mtime_ns, is a LoRA)
_seen_lock = threading.Lock()


@dataclass(frozen=True)
class LoraFile:
    """A LoRA as the tab names it: ``title`` ("LoRA: sub/name.safetensors"), ``name`` (title less the mark),
    ``filename`` (absolute path)."""

    title: str
    name: str
    filename: str


def lora_folder_for(cmd_lora_dir: str | None, models_path: str) -> str:
    """The WebUI's Lora folder: ``--lora-dir`` when given, else ``<models_path>/Lora`` (A1111 1.10 and Forge)."""
    return os.path.abspath(cmd_lora_dir or os.path.join(models_path, "Lora"))


def is_lora_title(title: str | None) -> bool:
    return bool(title) and title.startswith(LORA_MARK)


def lora_title(folder: str, path: str) -> str:
    """"LoRA: " + the path relative to the Lora folder, with "/" on every system."""
    return LORA_MARK + os.path.relpath(path, folder).replace(os.sep, "/")


def is_lora_file(path: str) -> bool:
    """True when the file holds LoRA factors (read from its header; remembered until it changes)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    with _seen_lock:
        known = _seen.get(path)
    if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
        return known[2]
    from .formats import keys_look_like_lora
    keys = _header_keys(path, st.st_size)
    answer = keys is not None and keys_look_like_lora(keys)   # unreadable: not offered (a merge would say why)
    with _seen_lock:
        _seen[path] = (st.st_size, st.st_mtime_ns, answer)
    return answer


def _header_keys(path: str, size: int) -> list[str] | None:
    """The tensor names in a safetensors header, or None when it is not one.

    Only the names: the full, validated open (offsets, shapes, duplicates) took 60 ms per SDXL LoRA, 30 s
    for a folder of 500; a merge validates the file anyway.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return None
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, _MAX_HEADER):
                return None
            header = json.loads(handle.read(length))
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    return [key for key in header if key != "__metadata__"]


def lora_files_in(folder: str) -> list[LoraFile]:
    """The LoRAs under ``folder`` (subfolders too, sorted, hidden files and folders skipped); [] if it is missing."""
    if not os.path.isdir(folder):
        return []
    folder = os.path.abspath(folder)
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(LORA_SUFFIXES):
                continue
            path = os.path.join(root, name)
            if is_lora_file(path):
                title = lora_title(folder, path)
                found.append(LoraFile(title, title[len(LORA_MARK):], path))
    return found


def _stem(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return os.path.splitext(base)[0] if base.lower().endswith(LORA_SUFFIXES) else base


def find_lora_in(files: Sequence[LoraFile], title: str, folder: str) -> LoraFile:
    """The LoRA shown as ``title``: "LoRA: sub/name.safetensors", the same without the mark, or just the
    file's stem ("name") when exactly one LoRA has it.  Refused in one line naming the folder otherwise."""
    wanted = title[len(LORA_MARK):].strip() if is_lora_title(title) else title.strip()
    for f in files:
        if f.name == wanted:
            return f
    matches = [f for f in files if _stem(f.name) == _stem(wanted)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise CheckpointError(f"names {len(matches)} LoRAs in {folder} ({', '.join(f.name for f in matches)}); "
                              "give the folder too", title)
    raise CheckpointError(f"no such LoRA in the Lora folder {folder} (refresh the list?)", title)


def base_choices(titles: Iterable[str]) -> list[str]:
    """The titles a base may be picked from: every one but the LoRAs (a LoRA holds no full weights)."""
    return [t for t in titles if not is_lora_title(t)]


def resolve_pasted_names(names: Iterable[str], titles: Sequence[str]) -> list[str | None]:
    """Infotext model names (file stems, as the X/Y/Z infotext writes them) -> titles of the lists, LoRAs
    included ("ink" -> "LoRA: styles/ink.safetensors"); None where none matches.  Checkpoints are tried first."""
    from ..xyz_axes import resolve_names
    names = list(names)
    plain = [t for t in titles if not is_lora_title(t)]
    loras = [t for t in titles if is_lora_title(t)]
    found = resolve_names(names, plain)
    missing = [i for i, hit in enumerate(found) if hit is None]
    if missing and loras:
        bare = resolve_names([names[i] for i in missing], [t[len(LORA_MARK):] for t in loras])
        for i, hit in zip(missing, bare):
            found[i] = None if hit is None else LORA_MARK + hit
    return found
