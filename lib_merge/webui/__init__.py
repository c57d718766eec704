"""The extension inside AUTOMATIC1111 1.10 / Forge 2: one session, one host adapter, one hot-loader.

``scripts/dare_merge.py`` (the only WebUI entry point) wires the callbacks
below into ``script_callbacks``; the tab, the HTTP route and the XYZ axes all
act on the process-wide :func:`get_session`, whose hot-loader is the host's.
Importing this package needs no WebUI; calling into it does.

For the XYZ script: :func:`hot_load_recipe` merges only when the recipe's
hash differs from the merge already in the model, and must be called from
inside a generation (which holds the queue lock) or under :func:`host.exclusive`.
"""
from __future__ import annotations

import hashlib
import threading
from typing import Callable

from ..api import input_hashes
from ..engine import Progress
from ..recipe import MergeRecipe
from ..session import MergeResult, MergeSession
from . import host

_lock = threading.Lock()
_session: MergeSession | None = None
_host: host.WebUIHost | None = None


class WebUISession(MergeSession):
    """The WebUI's session: a merge on the GPU first asks the host for room (Forge's memory manager
    unloads models until the merge fits; :func:`host.gpu_room`), whoever starts it (tab, HTTP, X/Y/Z)."""

    def merge(self, recipe: MergeRecipe, dtype: str = "fp16", device: str | None = None, **kwargs) -> MergeResult:
        with host.gpu_room(device or self.device, len(recipe.models)):
            return super().merge(recipe, dtype=dtype, device=device, **kwargs)


def make_hot_loader():
    """The hot-loader for the host this process runs in (:func:`host.detect`).

    The choice lives here, above the loaders, so the import arrows run one
    way: this package -> ``hotload_a1111``/``hotload_forge`` ->
    ``hotload_base`` -> ``host``.
    """
    if host.detect() == host.FORGE:
        from .hotload_forge import ForgeHotLoader
        return ForgeHotLoader()
    from .hotload_a1111 import A1111HotLoader
    return A1111HotLoader()


def get_session() -> MergeSession:
    """The process-wide merge session (created on first use; its hot_loader is this host's)."""
    global _session
    with _lock:
        if _session is None:
            loader = make_hot_loader()
            loader.registry.install()
            _session = WebUISession(host.models_dir(), hot_loader=loader, device=host.merge_device(),
                                    refresh_models=host.refresh_checkpoints)
            _session.protected_files = lambda: host.loaded_checkpoint_files(loader)
        return _session


def get_host() -> host.WebUIHost:
    """The tab's :class:`~lib_merge.ui.host.TabHost` for this WebUI."""
    global _host
    session = get_session()
    with _lock:
        if _host is None:
            _host = host.WebUIHost(session)
        return _host


def merge_or_reuse(recipe: MergeRecipe, dtype: str, device: str, hot_load: bool,
                   progress: Callable[[Progress], None] | None = None, stats: bool = False
                   ) -> tuple[MergeResult, bool]:
    """Merge, unless the session's in-memory result is this recipe (same hash, same dtype) already.

    Returns (result, reused).  With ``hot_load`` the result ends up in the
    running model either way (loaded again only if it is not there).  The
    caller holds the queue lock, or runs inside a generation.  ``stats``: the merge gathers its
    statistics (``report.stats``); a reused result keeps those it has.
    """
    session = get_session()
    loader = session.hot_loader
    inputs = input_hashes(recipe)
    wanted = recipe.recipe_hash(inputs)
    current = session.result
    if current is not None and current.recipe_hash == wanted and current.dtype == dtype:
        if hot_load and loader.loaded_recipe_hash() != wanted:
            with session.lock:
                loader.load(current.state, current.name, current.recipe_hash, current.recipe)
                session.hot_loaded = True
                session.last_message = f"hot-loaded {current.name} (kept in memory; not merged again)"
        return current, True

    def report(event: Progress) -> None:
        host.mirror_progress(event, session.cancel)
        if progress is not None:
            progress(event)

    def merge_on(where: str) -> MergeResult:
        return session.merge(recipe, dtype=dtype, device=where, hot_load=hot_load, progress=report, inputs=inputs,
                             stats=stats)

    try:
        result = merge_on(device)
    except Exception as exc:
        from ..compat import is_out_of_memory
        if not is_out_of_memory(exc):
            raise
        host.free_vram(device)          # the X/Y/Z input cache, torch's cached blocks of that device
        if not str(device).startswith("cuda"):
            raise host.out_of_memory_error(exc, device) from None
        print(f"[DARE Merge] out of memory merging on {device}; the merge input cache was dropped and the "
              "merge runs on the CPU instead", flush=True)
        try:
            result = merge_on("cpu")
        except Exception as again:
            if not is_out_of_memory(again):
                raise
            raise host.out_of_memory_error(again, "cpu") from None
        session.last_message = f"out of memory on {device}: merged on the CPU instead. {session.last_message}"
    note = host.merge_device_info().note if str(device) == host.merge_device() else ""
    if note:
        session.last_message = f"{note}. {session.last_message}"
    return result, False


def hot_load_recipe(recipe: MergeRecipe, dtype: str | None = None, device: str | None = None,
                    progress: Callable[[Progress], None] | None = None) -> MergeResult:
    """Make ``recipe``'s merge the running model; merge only if it is not already there.

    Same recipe hash as the loaded merge: nothing happens.  Same hash as the
    session's in-memory result that is not loaded (after a "Restore"): it is
    loaded without merging.  Otherwise a merge runs on the WebUI's device.
    For the XYZ script: call it from inside the generation (``before_process``),
    which already holds the queue lock.
    """
    result, _ = merge_or_reuse(recipe, dtype or host.merge_precision(), device or host.merge_device(), True,
                               progress)
    return result


def status(with_fingerprint: bool = False) -> dict:
    """What the session and the running model look like (the HTTP status route)."""
    session = get_session()
    loader = session.hot_loader
    out = dict(session.status())
    loaded_hash = loader.loaded_recipe_hash()
    out.update({
        "host": host.detect(), "webui_version": host.version(),
        "loaded_model": loader.loaded_title(), "loaded_recipe_hash": loaded_hash,
        # what is in the model now, not what the last merge did (the user may have switched since)
        "hot_loaded": loaded_hash is not None, "selected_model": host.setting("sd_model_checkpoint", None),
        "original": getattr(loader._current(loader.original), "title", None),
        "settings": {"device": host.merge_device(), "device_note": host.merge_device_info().note,
                     "precision": host.merge_precision(), "cache_mb": host.cache_budget_mb()},
    })
    if with_fingerprint:
        with host.exclusive("DARE merge: fingerprint"):
            parts = loader.fingerprints()
            out["fingerprint"] = hashlib.sha256(f"{parts['params']}:{parts['buffers']}".encode()).hexdigest()
            out["param_fingerprint"] = parts["params"]
            out["storage"] = loader.storage()
    return out


# -- script_callbacks handlers (registered by scripts/dare_merge.py) --------------------

def on_ui_tabs():
    """The "DARE Merge" tab, built by lib_merge.ui.tab over this WebUI's host."""
    from ..ui import tab
    blocks = tab.build_tab(get_host())
    return [(blocks, "DARE Merge", "dare_merge")]


def on_ui_settings() -> None:
    host.add_settings()


def on_app_started(_demo, app) -> None:
    from .api import register
    register(app)


def on_script_unloaded() -> None:
    """Undo the hooks before the scripts are re-executed (they are installed again then)."""
    from . import state
    from .hotload_base import Registry
    Registry.uninstall()
    state.uninstall()
    if host.detect() == host.FORGE:
        from .hotload_forge import uninstall_reload_guard
        uninstall_reload_guard()


def setup() -> None:
    """At script load: hooks, and the settings (``--nowebui`` never runs ``on_ui_settings``, yet
    ``/sdapi/v1/options`` should let API users set them)."""
    install_hooks()
    host.add_settings()
    from modules import script_callbacks

    from . import state
    script_callbacks.on_model_loaded(state.on_model_loaded)


def install_hooks() -> None:
    """Install the checkpoint-list (and Forge reload) hooks for an existing session."""
    session = get_session()
    loader = session.hot_loader
    if hasattr(loader, "install"):
        loader.install()
    else:
        loader.registry.install()
    from . import state
    state.install()       # select_checkpoint / state-dict / config.json guards (issue 15)


__all__ = ["make_hot_loader", "get_session", "get_host", "hot_load_recipe", "merge_or_reuse", "status", "on_ui_tabs",
           "on_ui_settings", "on_app_started", "on_script_unloaded", "install_hooks", "setup"]
