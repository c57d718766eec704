"""The name a user gives a merge to save: refused up front when a file system would refuse it.

Why a separate check: the HTTP route and the tab used to learn that a name
was too long only when the writer created the file, after a merge of
minutes (``OSError [Errno 36] File name too long``, a 500).  Everything here
runs before any merge and raises :class:`~lib_merge.errors.OutputError`
(HTTP 400, one line in the tab).

The rule is the portable one, so a name that works on Linux also works when
the same WebUI runs on Windows or macOS (and a saved merge can be copied
between them):

- what :func:`lib_merge.writer.check_output_name` refuses (path separators,
  a leading dot, ``<>:"|?*`` and control characters, device names), and
  ``.safetensors`` is added;
- Windows device names in every form Windows treats as the device:
  ``CON``, ``nul.txt``, ``aux .x``, ``COM¹``, ``CONIN$``, any case;
- characters that cannot be stored at all (lone surrogates from JSON
  ``"\\udc80"``), and DEL;
- the length: at most 255 bytes of UTF-8 *and* 255 UTF-16 units per name
  (ext4/XFS/btrfs/APFS count bytes, NTFS counts UTF-16 units), less what
  the writer's hidden temporary file ``.<name>.dare-merge-<pid>[.n].part``
  adds, and less if the folder's own file system allows fewer
  (``pathconf``); the whole temporary path must fit ``PATH_MAX`` (260 on
  Windows without long paths).
"""
from __future__ import annotations

import os

from .errors import OutputError
from .writer import check_output_name

NAME_MAX = 255                      # bytes (POSIX file systems) and UTF-16 units (NTFS) per path component
SUFFIX = ".safetensors"
# ".<name>" + TEMP_MARK + pid (at most 10 digits) + ".<attempt>" (at most 999) + ".part"
TEMP_OVERHEAD = 1 + len(".dare-merge-") + 10 + 4 + len(".part")
WINDOWS_PATH_MAX = 259              # MAX_PATH (260) less the terminating NUL
_DEVICES = {"con", "prn", "aux", "nul", "conin$", "conout$", "clock$",
            *(f"com{c}" for c in "123456789¹²³"), *(f"lpt{c}" for c in "123456789¹²³")}


def _shown(name: str) -> str:
    """The name as it goes into a one-line message (a 300-character name is cut)."""
    text = name if len(name) <= 60 else name[:40] + f"… ({len(name)} characters)"
    return repr(text)


def name_limit(folder: str | None = None) -> int:
    """Bytes a file name may have in ``folder`` (and everywhere else: never above 255)."""
    limit = NAME_MAX
    if folder and hasattr(os, "pathconf"):
        try:
            limit = min(limit, int(os.pathconf(folder, "PC_NAME_MAX")))
        except (OSError, ValueError):
            pass
    return limit


def path_limit(folder: str | None = None) -> int:
    """Characters a whole path may have in ``folder`` (4096 on Linux; 259 on Windows)."""
    if os.name == "nt":
        return WINDOWS_PATH_MAX
    if folder and hasattr(os, "pathconf"):
        try:
            return int(os.pathconf(folder, "PC_PATH_MAX")) - 1
        except (OSError, ValueError):
            pass
    return 4095


def max_name_bytes(folder: str | None = None) -> int:
    """The longest saved name (``.safetensors`` included) in UTF-8 bytes that the writer can create."""
    return name_limit(folder) - TEMP_OVERHEAD


def check_save_name(name: str, folder: str | None = None) -> str:
    """The file name a merge is saved under (``.safetensors`` added), or :class:`OutputError`.

    ``folder`` is where it will be written (the WebUI's checkpoint folder):
    its file system's name limit and the whole path's length are checked
    too.  Nothing is created.
    """
    filename = check_output_name(str(name or ""))
    shown = _shown(str(name).strip())
    try:
        encoded = filename.encode("utf-8")
        units = len(filename.encode("utf-16-le")) // 2
    except UnicodeEncodeError:
        raise OutputError(f"the output name {shown} holds characters that cannot be stored in a file name "
                          "(unpaired surrogates)") from None
    if "\x7f" in filename:
        raise OutputError(f"the output name {shown} contains characters that are not allowed in file names")
    stem = filename[:-len(SUFFIX)] if filename.lower().endswith(SUFFIX) else filename
    device = stem.split(".")[0].rstrip(" ").lower()
    if device in _DEVICES:
        raise OutputError(f"the output name {shown} is a reserved device name on Windows ({device.upper()})")
    most = max_name_bytes(folder)
    if len(encoded) > most or units > most:
        raise OutputError(f"the output name {shown} is too long: {len(encoded)} bytes with {SUFFIX}, at most "
                          f"{most} fit (file names are limited to {name_limit(folder)} bytes, and saving writes a "
                          f"temporary file with {TEMP_OVERHEAD} more)")
    if folder:
        temp = os.path.join(os.path.abspath(folder), "." + filename) + "x" * (TEMP_OVERHEAD - 1)
        if len(temp) > path_limit(folder):
            raise OutputError(f"the output name {shown} makes the path too long for this system "
                              f"({len(temp)} characters with the temporary file's suffix, at most "
                              f"{path_limit(folder)}); choose a shorter name", folder)
    return filename


__all__ = ["check_save_name", "max_name_bytes", "name_limit", "path_limit", "TEMP_OVERHEAD", "NAME_MAX"]
