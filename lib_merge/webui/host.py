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
from ..errors import CheckpointError, MergeError
from ..lora.listing import LORA_MARK, LoraFile, find_lora_in, lora_files_in, lora_folder_for
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
    """The CheckpointInfo for a title, short name, hash or path in the WebUI's list (or a "LoRA: " title)."""
    from modules import sd_models
    text = (title_or_path or "").strip()
    if not text:
        raise CheckpointError("no checkpoint given")
    if text.startswith(LORA_MARK):
        return find_lora(text)
    if os.path.isabs(text):
        real = os.path.realpath(text)
        for info in [*checkpoint_infos(), *lora_infos()]:
            if os.path.realpath(info.filename) == real:
                return info
        raise CheckpointError("is not in the WebUI's checkpoint list (refresh the list, or put it in "
                              f"{models_dir()})", text)
    info = sd_models.get_closet_checkpoint_match(text)
    if info is None or is_merged_info(info):
        raise CheckpointError("no such checkpoint in the WebUI's list (refresh it?)", text)
    return info


# -- LoRAs (issue 11): listed beside the checkpoints, marked, resolved from the Lora folder ------------
# The logic is lib_merge.lora.listing (plain values, tested without a WebUI); here only the settings are read.

LoraInfo = LoraFile


def lora_dir() -> str:
    """The WebUI's Lora folder: ``--lora-dir``, else models/Lora (where its built-in Lora extension looks)."""
    from modules import paths, shared
    return lora_folder_for(getattr(shared.cmd_opts, "lora_dir", None), paths.models_path)


def lora_infos() -> list[LoraFile]:
    """The LoRAs in the Lora folder, recognised by content (a checkpoint or a broken file there is left out)."""
    try:
        folder = lora_dir()
    except Exception:   # no Lora folder setting in this host: no LoRAs listed
        return []
    return lora_files_in(folder)


def lora_titles() -> list[str]:
    return [info.title for info in lora_infos()]


def find_lora(title: str) -> LoraFile:
    """The LoRA shown as ``title`` ("LoRA: name.safetensors", or without the folder or the suffix)."""
    return find_lora_in(lora_infos(), title, lora_dir())


def refresh_loras() -> None:
    """Have the WebUI's Lora extension re-scan its folder (after "Save as LoRA"); quiet where it is absent."""
    try:
        import networks   # extensions-builtin/Lora (A1111) or sd_forge_lora (Forge), on sys.path in the WebUI
        networks.list_available_networks()
    except Exception:
        pass


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


def resolve_device(choice: str, webui: str):
    """The :class:`lib_merge.devices.MergeDevice` for the "Merge device" setting ``choice``.

    "auto" is the WebUI's own device, index kept (``cuda:1`` stays ``cuda:1``);
    "cuda" is the WebUI's card when it runs on CUDA, else the current CUDA
    device.  A WebUI on mps/xpu (or anything not CUDA) merges on the CPU with
    a note saying so (see ``lib_merge.devices``): the hot-load then copies the
    CPU result into the model wherever it is.
    """
    from ..devices import resolve_merge_device
    if choice == "cpu":
        return resolve_merge_device("cpu", webui)
    if choice == "cuda":
        return resolve_merge_device(webui if webui.startswith("cuda") else "cuda", webui)
    return resolve_merge_device("auto", webui)


def merge_device_info():
    """The merge device for the current settings, and why it is not the WebUI's (``.note``)."""
    return resolve_device(str(setting(OPT_DEVICE, "auto")), webui_device())


def merge_device() -> str:
    """The device merges run on (see :func:`resolve_device`)."""
    return merge_device_info().device


def loaded_checkpoint_files(loader=None) -> list[str]:
    """Files a save must never replace: the checkpoint in the model now and the one "Restore original"
    goes back to (a merge's own entry names no real file and is skipped)."""
    infos = [getattr(loader, "original", None)]
    try:
        from modules import sd_models
        infos.append(getattr(getattr(sd_models.model_data, "sd_model", None), "sd_checkpoint_info", None))
    except Exception:
        pass
    files = []
    for info in infos:
        filename = getattr(info, "filename", None)
        if filename and not is_merged_info(info) and os.path.isfile(filename):
            files.append(filename)
    return files


def low_vram_mode() -> bool:
    """True when the WebUI keeps model parts off the GPU to save VRAM (``--lowvram``/``--medvram``,
    ``--medvram-sdxl`` with an SDXL model loaded): there is no VRAM to spare for a merge cache."""
    try:
        from modules import shared
        opts = shared.cmd_opts
        if getattr(opts, "lowvram", False) or getattr(opts, "medvram", False):
            return True
        from modules import sd_models
        model = getattr(sd_models.model_data, "sd_model", None)
        if getattr(model, "lowvram", False):
            return True
        return bool(getattr(opts, "medvram_sdxl", False) and getattr(model, "is_sdxl", False))
    except Exception:
        return True   # unknown: spare nothing


# -- VRAM that belongs to the WebUI ---------------------------------------------------------

_vram_holders: list[Callable[[], object]] = []


def on_free_vram(release: Callable[[], object]) -> None:
    """Register a function that gives back VRAM the extension holds (the X/Y/Z input cache)."""
    if release not in _vram_holders:
        _vram_holders.append(release)


def free_vram(device: str) -> None:
    """After an out-of-memory error on ``device``: every registered holder lets go, then torch's
    cached blocks of that device go back to the driver (``compat.empty_cache``: the merge device's
    own index, not the current device)."""
    from ..compat import empty_cache
    for release in list(_vram_holders):
        try:
            release()
        except Exception as exc:  # freeing must never raise over the error that caused it
            print(f"[DARE Merge] could not free VRAM: {exc}", flush=True)
    empty_cache(device)


def out_of_memory_error(exc: BaseException, device: str) -> MergeError:
    """The one line a user sees for an out-of-memory merge, with what was done and what to try."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    return MergeError(f"out of memory while merging on {device} ({first}); the merge input cache was dropped and "
                      "torch's cached VRAM given back. Merge on the cpu device (Settings > DARE Merge > Merge "
                      "device), set 'X/Y/Z merge input cache on the GPU' to 0, or start the WebUI with --medvram")


# A merge's working set on the GPU besides the input cache (chunk workspaces, the trim's per-key
# magnitudes for every model, the merged key before it goes to the CPU): generous for SDXL.
MERGE_ROOM_MB = 1024
MERGE_ROOM_PER_MODEL_MB = 384


def forge_room_bytes(dev, n_models: int, kind: str | None) -> int | None:
    """The room :func:`gpu_room` asks Forge for before merging ``n_models`` models on the torch
    device ``dev``, in bytes; None where nothing is asked (a non-CUDA merge, or a host ``kind`` that
    is not Forge)."""
    if dev.type != "cuda" or kind != FORGE:
        return None
    return (MERGE_ROOM_MB + MERGE_ROOM_PER_MODEL_MB * max(1, n_models)) * (1 << 20)


def _ask_forge_for_room(needed: int, dev) -> None:
    from backend import memory_management
    memory_management.free_memory(needed, dev)


@contextlib.contextmanager
def gpu_room(device: str, n_models: int) -> Iterator[None]:
    """On Forge, ask its memory manager for room before a GPU merge, and give it back after.

    Forge keeps models on the GPU as long as they fit and moves them off only
    when its own loader asks (``backend.memory_management.free_memory``); a
    merge allocating beside them could make the next sampling run out of
    memory.  So before a merge on a CUDA device, Forge unloads models until
    the merge's working set fits; after it, torch's cached blocks of that
    device are released so Forge sees the memory free again (it loads the
    model back itself at the next generation).  A1111 and CPU merges: nothing.
    """
    from ..compat import with_index
    dev = with_index(device)      # Forge compares devices with ==: cuda must carry its index
    needed = forge_room_bytes(dev, n_models, detect() if dev.type == "cuda" else None)
    if needed is None:
        yield
        return
    _ask_forge_for_room(needed, dev)
    try:
        yield
    finally:
        from ..compat import empty_cache
        empty_cache(dev)


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
    ).info("where merges run; auto = the WebUI's own device (cuda:1 stays cuda:1); a WebUI on mps/xpu merges "
           "on the CPU until those are tested (same result; hot-load unchanged)"))
    opts.add_option(OPT_PRECISION, shared.OptionInfo(
        "auto", "Working precision of hot-loaded merges", gr.Radio, {"choices": list(PRECISION_CHOICES)},
        section=SECTION,
    ).info("dtype the merged weights are held in; auto = fp32 with --no-half / --all-in-fp32, else fp16"))
    opts.add_option(OPT_CACHE_MB, shared.OptionInfo(
        DEFAULT_CACHE_MB, "X/Y/Z merge input cache in RAM (MB)", gr.Number, {"precision": 0, "minimum": 0},
        section=SECTION,
    ).info("the base and models of X/Y/Z merges kept in RAM between cells, so a cell merges without reading "
           "the files again; 0 = no cache"))


# -- the tab's host --------------------------------------------------------------------

class WebUIHost(TabHost):
    """The tab inside A1111/Forge: the WebUI's checkpoints, device, queue lock and progress bar."""

    can_hot_load = True
    show_inspect = True

    def __init__(self, session) -> None:
        self.session = session
        self.kind = detect()

    def list_checkpoints(self) -> list[str]:
        return checkpoint_titles() + lora_titles()   # LoRAs after the checkpoints, marked "LoRA: "

    def resolve(self, title: str) -> str:
        return find_checkpoint(title).filename

    def refresh(self) -> None:
        refresh_checkpoints()
        refresh_loras()

    def lora_folder(self) -> str:
        folder = lora_dir()
        os.makedirs(folder, exist_ok=True)
        return folder

    def default_device(self) -> str:
        return merge_device()     # "cuda:1" stays "cuda:1" (the tab lists it beside cpu and cuda)

    def default_precision(self) -> str:
        return merge_precision()

    def run_exclusive(self, fn: Callable[[], T], task_id: str | None = None) -> T:
        """Run ``fn`` under the queue lock; ``task_id``: a page-made "task(...)" id for the progress bar.

        Out of memory in ``fn`` (a merge from the tab): the VRAM the extension
        holds is given back (:func:`free_vram`) and one line with advice replaces
        the traceback."""
        from ..compat import is_out_of_memory
        with exclusive(task_id=task_id):
            try:
                return fn()
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                device = merge_device()
                free_vram(device)
                raise out_of_memory_error(exc, device) from None

    def on_progress(self, event: Progress) -> None:
        mirror_progress(event, self.session.cancel)


__all__ = ["LORA_MARK", "lora_dir", "lora_infos", "lora_titles", "find_lora", "refresh_loras",
           "A1111", "FORGE", "detect", "version", "in_webui", "models_dir", "checkpoint_titles",
           "checkpoint_infos", "find_checkpoint", "refresh_checkpoints", "is_merged_info", "webui_device",
           "merge_device", "merge_device_info", "resolve_device", "low_vram_mode", "on_free_vram", "free_vram",
           "gpu_room", "out_of_memory_error", "merge_precision", "cache_budget_mb", "exclusive", "holds_queue_lock",
           "mirror_progress", "interrupted", "add_settings", "WebUIHost", "SECTION"]
