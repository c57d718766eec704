"""The one place where AUTOMATIC1111 and Forge differ, as far as the merge is concerned.

Everything here imports the WebUI's ``modules`` lazily, inside functions, so
the package stays importable (and testable) without a WebUI.  The rest of
``lib_merge.webui`` asks this module for: which host it runs in, the
checkpoint list and folder, the device, the queue lock, the progress bar
(``shared.state``) and the extension's settings.  The hot-load itself lives
in :mod:`.hotload_a1111` and :mod:`.hotload_forge` (shared parts in
:mod:`.hotload_base`) because it is long; ``lib_merge.webui.make_hot_loader``
picks one by :func:`detect`.  Nothing here imports those modules.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
import time
from typing import Callable, Iterator, TypeVar

from ..engine import Progress
from ..errors import CheckpointError
from ..ui.host import TabHost

T = TypeVar("T")

A1111 = "a1111"
FORGE = "forge"

SECTION = ("dare_merge", "DARE Merge")
OPT_DEVICE = "dare_merge_device"
OPT_PRECISION = "dare_merge_precision"
OPT_CACHE_MB = "dare_merge_cache_mb"
DEVICE_CHOICES = ("auto", "cpu", "cuda")
PRECISION_CHOICES = ("auto", "fp16", "bf16", "fp32")
DEFAULT_CACHE_MB = 4096


def in_webui() -> bool:
    """True inside a running A1111/Forge process (its ``modules`` package is importable)."""
    try:
        return importlib.util.find_spec("modules.sd_models") is not None \
            and importlib.util.find_spec("modules.shared") is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=1)
def detect() -> str:
    """``"forge"`` for Forge 2 (model loading through ``forge_model_reload``), else ``"a1111"``.

    Feature detection rather than the version string: Forge 2's
    ``sd_models.load_model`` is a stub and its ``SdModelData`` carries
    ``forge_loading_parameters``; A1111 (and reForge, whose ``load_model``
    works) has neither.  :func:`version` reports ``git_tag()`` for the status.
    """
    from modules import sd_models
    if hasattr(sd_models, "forge_model_reload") and hasattr(sd_models.model_data, "forge_loading_parameters"):
        return FORGE
    return A1111


@functools.lru_cache(maxsize=1)
def version() -> str:
    """The WebUI's own version tag (A1111 ``v1.10.1``, Forge ``f2.0.1v1.10.1-...``)."""
    try:
        from modules import launch_utils
        return str(launch_utils.git_tag())
    except Exception:  # a version string is informative only
        return "unknown"


# -- checkpoints -------------------------------------------------------------------

def models_dir() -> str:
    """Where the WebUI keeps checkpoints and where "Save" writes (as the built-in merger does)."""
    from modules import sd_models, shared
    return os.path.abspath(shared.cmd_opts.ckpt_dir or sd_models.model_path)


def is_merged_info(info: object) -> bool:
    """A CheckpointInfo made by the hot-load (it has no file behind it)."""
    return bool(getattr(info, "dare_merge", None))


def checkpoint_infos() -> list:
    """The WebUI's checkpoints that exist as files (merges held in memory are left out)."""
    from modules import sd_models
    return [info for info in list(sd_models.checkpoints_list.values()) if not is_merged_info(info)]


def checkpoint_titles() -> list[str]:
    return [info.title for info in checkpoint_infos()]


def find_checkpoint(title_or_path: str):
    """The CheckpointInfo for a title, short name, hash or path in the WebUI's list."""
    from modules import sd_models
    text = (title_or_path or "").strip()
    if not text:
        raise CheckpointError("no checkpoint given")
    if os.path.isabs(text):
        real = os.path.realpath(text)
        for info in checkpoint_infos():
            if os.path.realpath(info.filename) == real:
                return info
        raise CheckpointError("is not in the WebUI's checkpoint list (refresh the list, or put it in "
                              f"{models_dir()})", text)
    info = sd_models.get_closet_checkpoint_match(text)
    if info is None or is_merged_info(info):
        raise CheckpointError("no such checkpoint in the WebUI's list (refresh it?)", text)
    return info


def refresh_checkpoints() -> None:
    """Re-scan the checkpoint folders (the hot-load keeps its in-memory merge registered)."""
    from modules import sd_models
    sd_models.list_models()


# -- device, queue lock, progress -----------------------------------------------------

def webui_device() -> str:
    from modules import shared
    device = getattr(shared, "device", None)
    if device is None:
        from modules import devices
        device = devices.device
    return str(device)


def setting(key: str, default):
    try:
        from modules import shared
        value = shared.opts.data.get(key, default)
    except Exception:
        return default
    return default if value is None else value


def merge_device() -> str:
    """The device merges run on: the setting, where "auto" is the WebUI's own device."""
    choice = str(setting(OPT_DEVICE, "auto"))
    if choice == "cuda":
        import torch
        return "cuda" if torch.cuda.is_available() else webui_device()
    if choice == "cpu":
        return "cpu"
    return webui_device()


def merge_precision() -> str:
    """Working precision of a merge that will be hot-loaded ("auto": the model's own dtype)."""
    choice = str(setting(OPT_PRECISION, "auto"))
    if choice in ("fp16", "bf16", "fp32"):
        return choice
    return "fp32" if model_runs_fp32() else "fp16"


def model_runs_fp32() -> bool:
    from modules import shared
    opts = shared.cmd_opts
    if detect() == FORGE:
        return bool(getattr(opts, "all_in_fp32", False) or getattr(opts, "always_cpu", False))
    return bool(getattr(opts, "no_half", False))


def cache_budget_mb() -> int:
    """RAM the XYZ merge cache may hold, in MB (Settings > DARE Merge)."""
    try:
        return max(0, int(setting(OPT_CACHE_MB, DEFAULT_CACHE_MB)))
    except (TypeError, ValueError):
        return DEFAULT_CACHE_MB


def queue_lock():
    from modules import call_queue
    return call_queue.queue_lock


_held = threading.local()


def holds_queue_lock() -> bool:
    """True in a thread that entered :func:`exclusive` (the lock is not re-entrant)."""
    return bool(getattr(_held, "depth", 0))


@contextlib.contextmanager
def exclusive(job: str = "DARE merge", task_id: str | None = None) -> Iterator[float]:
    """Hold the WebUI's queue lock (wait for any generation to end) and own ``shared.state``.

    Yields the seconds spent waiting for the lock.  Re-entering from the same
    thread does not wait again; code that already runs inside a generation
    (an XYZ cell) must not come here at all, because the generation holds the
    lock.  With ``task_id`` (a ``"task(...)"`` id made by the page, as
    txt2img's is) the WebUI's progress API reports the work under that id, so
    the page's own progress bar (``requestProgress``) can follow it.
    """
    from modules import shared
    progress = _progress_module() if task_id else None
    if progress is not None:
        progress.add_task_to_queue(task_id)
    if holds_queue_lock():
        _held.depth += 1
        try:
            yield 0.0
        finally:
            _held.depth -= 1
        return
    lock = queue_lock()
    started = time.perf_counter()
    lock.acquire()
    waited = time.perf_counter() - started
    _held.depth = 1
    try:
        shared.state.begin(job=job)
        shared.state.job_count = 1
        shared.state.textinfo = job
        if progress is not None:
            progress.start_task(task_id)
        try:
            yield waited
        finally:
            if progress is not None:
                progress.finish_task(task_id)
            shared.state.end()
            shared.state.interrupted = False
            shared.state.skipped = False
            shared.state.textinfo = None
    finally:
        _held.depth = 0
        lock.release()


def _progress_module():
    try:
        from modules import progress
        return progress
    except ImportError:
        return None


def mirror_progress(event: Progress, on_interrupt: Callable[[], object] | None = None) -> None:
    """Show merge progress in the WebUI's progress bar; honour its Interrupt button."""
    from modules import shared
    state = shared.state
    state.sampling_steps = max(1, event.keys_total)
    state.sampling_step = event.keys_done
    state.textinfo = f"DARE merge: {event.keys_done}/{event.keys_total} keys ({event.key})"
    if state.interrupted and on_interrupt is not None:
        on_interrupt()


def interrupted() -> bool:
    try:
        from modules import shared
        return bool(shared.state.interrupted)
    except Exception:
        return False


# -- settings --------------------------------------------------------------------------

def add_settings() -> None:
    """Settings > DARE Merge (``on_ui_settings``, and at load; adding an option twice is harmless)."""
    import gradio as gr
    from modules import shared
    opts = shared.opts
    opts.add_option(OPT_DEVICE, shared.OptionInfo(
        "auto", "Merge device", gr.Radio, {"choices": list(DEVICE_CHOICES)}, section=SECTION,
    ).info("where merges run; auto = the WebUI's own device"))
    opts.add_option(OPT_PRECISION, shared.OptionInfo(
        "auto", "Working precision of hot-loaded merges", gr.Radio, {"choices": list(PRECISION_CHOICES)},
        section=SECTION,
    ).info("dtype the merged weights are held in; auto = fp32 with --no-half / --all-in-fp32, else fp16"))
    opts.add_option(OPT_CACHE_MB, shared.OptionInfo(
        DEFAULT_CACHE_MB, "XYZ merge cache budget (MB of RAM)", gr.Number, {"precision": 0, "minimum": 0},
        section=SECTION,
    ).info("merged models kept in RAM so XYZ cells with the same merge do not merge again; 0 = no cache"))


# -- the tab's host --------------------------------------------------------------------

class WebUIHost(TabHost):
    """The tab inside A1111/Forge: the WebUI's checkpoints, device, queue lock and progress bar."""

    can_hot_load = True
    show_inspect = True

    def __init__(self, session) -> None:
        self.session = session
        self.kind = detect()

    def list_checkpoints(self) -> list[str]:
        return checkpoint_titles()

    def resolve(self, title: str) -> str:
        return find_checkpoint(title).filename

    def refresh(self) -> None:
        refresh_checkpoints()

    def default_device(self) -> str:
        device = merge_device()
        return "cuda" if device.startswith("cuda") else device

    def default_precision(self) -> str:
        return merge_precision()

    def run_exclusive(self, fn: Callable[[], T], task_id: str | None = None) -> T:
        """Run ``fn`` under the queue lock; ``task_id``: a page-made "task(...)" id for the progress bar."""
        with exclusive(task_id=task_id):
            return fn()

    def on_progress(self, event: Progress) -> None:
        mirror_progress(event, self.session.cancel)


__all__ = ["A1111", "FORGE", "detect", "version", "in_webui", "models_dir", "checkpoint_titles",
           "checkpoint_infos", "find_checkpoint", "refresh_checkpoints", "is_merged_info", "webui_device",
           "merge_device", "merge_precision", "cache_budget_mb", "exclusive", "holds_queue_lock",
           "mirror_progress", "interrupted", "add_settings", "WebUIHost", "SECTION"]
