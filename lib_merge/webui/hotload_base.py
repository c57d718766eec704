"""What both hot-loaders share: put merged weights into the running WebUI model, and take them out again.

The loaders themselves are :class:`.hotload_a1111.A1111HotLoader` and
:class:`.hotload_forge.ForgeHotLoader`; both implement
``lib_merge.session.HotLoader`` (``load``/``restore``), and
``lib_merge.webui.make_hot_loader`` picks one for the host
:func:`.host.detect` finds.  This module imports neither of them (the
arrows run loader -> base -> host).  What is here:

- :func:`merged_info` — the CheckpointInfo a merge is shown as.  Each merge
  gets its own object (A1111 and Forge key the prompt cache on the object),
  a name and short hash from the recipe (so infotext says
  ``Model: dare-merge-<method>-<hash>, Model hash: <hash>``) and a file name
  that does not exist: no code path can mistake it for its base's file, so
  picking the base in the checkpoint dropdown really loads the base again.
  Its ``calculate_shorthash`` returns the recipe hash without touching the
  disk or the WebUI's hash cache.
- :class:`Registry` — keeps that CheckpointInfo in ``checkpoints_list`` while
  its weights are loaded, across ``sd_models.list_models()`` refreshes (which
  clear the list; without this, the next generation would fall back to some
  other checkpoint).
- :class:`CheckpointTracking` — the base class of both loaders: the
  "Restore original" target, the listed CheckpointInfo of a file, and
  :meth:`CheckpointTracking._write_or_roll_back`, the write-then-put-back
  loop both loaders run.
- :data:`FAULTS` — a test hook (only with ``DARE_MERGE_TEST_HOOKS=1``) that
  makes the next hot-load fail part-way, to prove the previous weights come
  back; :func:`fingerprint` hashes every parameter to check exactly that.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import threading
from typing import Callable, Iterable

import torch

from ..compat import register_load_state_dict_pre_hook
from ..errors import MergeError
from . import host

TEST_HOOKS_ENV = "DARE_MERGE_TEST_HOOKS"
VIRTUAL_SUFFIX = ".dare-merge-in-memory"


class HotLoadError(MergeError):
    """The merged weights could not be put into the running model (the previous ones are back)."""


class InjectedFault(RuntimeError):
    """Raised part-way through a hot-load by the test hook."""


def test_hooks_enabled() -> bool:
    return os.environ.get(TEST_HOOKS_ENV, "") == "1"


class FaultInjector:
    """Arms one failure of the next hot-load after ``after`` tensors/modules were written."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.after: int | None = None
        self.fired = 0

    def arm(self, after: int) -> None:
        if not test_hooks_enabled():
            raise MergeError(f"test hooks are off (set {TEST_HOOKS_ENV}=1)")
        with self._lock:
            self.after = max(0, int(after))

    def take(self) -> int | None:
        """The armed position, disarming it (each arming fails exactly one hot-load)."""
        with self._lock:
            after, self.after = self.after, None
            return after

    def fire(self, where: str) -> None:
        self.fired += 1
        raise InjectedFault(f"injected failure during hot-load ({where})")


FAULTS = FaultInjector()


def install_module_fault(modules: list[torch.nn.Module], after: int | None) -> list:
    """Make ``load_state_dict`` fail when it reaches module number ``after`` (test hook).

    Modules before it have already been written when it fails: a real
    part-way failure, as an OOM or a bad tensor would cause.
    """
    if after is None or not modules:
        return []
    target = modules[min(after, len(modules) - 1)]

    def hook(*_args, **_kwargs):
        FAULTS.fire(f"module {min(after, len(modules) - 1)} of {len(modules)}")

    return [register_load_state_dict_pre_hook(target, hook)]   # torch 2.1-2.4: the private method


def fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (sorted by name)."""
    digest = hashlib.sha256()
    seen: dict[str, torch.Tensor] = {}
    for name, tensor in named_tensors:
        if tensor is not None:
            seen.setdefault(name, tensor)
    with torch.no_grad():
        for name in sorted(seen):
            t = seen[name].detach()
            if t.is_meta:
                digest.update(f"{name}:meta".encode())
                continue
            flat = t.to("cpu").contiguous().reshape(-1)
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            if flat.numel():
                digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dtype_counts(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, int]:
    """How many parameters are stored in each dtype (fp16/fp8 storage must survive a hot-load)."""
    counts: dict[str, int] = {}
    for _, tensor in named_tensors:
        key = str(tensor.dtype).replace("torch.", "")
        counts[key] = counts.get(key, 0) + 1
    return counts


# -- the CheckpointInfo of a merge -----------------------------------------------------

_INFO_CLASSES: dict[type, type] = {}


def _merged_info_class(base_cls: type) -> type:
    """A subclass of the host's CheckpointInfo whose hash comes from the recipe, not a file."""
    cls = _INFO_CLASSES.get(base_cls)
    if cls is None:
        def calculate_shorthash(self):
            return self.shorthash

        cls = type("MergedCheckpointInfo", (base_cls,), {
            "__doc__": "A merge held in memory by sd-webui-dare-merge (no file behind it).",
            "calculate_shorthash": calculate_shorthash,
        })
        _INFO_CLASSES[base_cls] = cls
    return cls


def merged_info(base_info, name: str, recipe_hash: str, recipe_doc: dict, folder: str):
    """A new CheckpointInfo for one hot-loaded merge, modelled on its base's."""
    cls = _merged_info_class(type(base_info))
    info = cls.__new__(cls)
    info.__dict__.update(copy.deepcopy({k: v for k, v in base_info.__dict__.items()
                                         if k not in ("dare_merge", "dare_merge_base")}))
    tail = hashlib.sha256(f"sd-webui-dare-merge:{recipe_hash}".encode()).hexdigest()
    sha256 = (recipe_hash + tail)[:64]
    info.filename = os.path.join(folder, name + VIRTUAL_SUFFIX)
    info.is_safetensors = False
    info.name = name
    info.name_for_extra = name
    info.model_name = name
    info.hash = recipe_hash[:8]
    info.sha256 = sha256
    info.shorthash = recipe_hash
    info.title = f"{name} [{recipe_hash}]"
    info.short_title = info.title
    info.ids = [info.title, name, recipe_hash, sha256]
    info.metadata = {"dare_merge_recipe": recipe_doc}
    info.dare_merge = {"recipe_hash": recipe_hash, "base_title": getattr(base_info, "title", None),
                       "base_filename": getattr(base_info, "filename", None)}
    info.dare_merge_base = base_info
    return info


def recipe_doc(recipe) -> dict:
    try:
        return json.loads(json.dumps(recipe.to_json_dict(), default=str))
    except Exception:  # metadata is informative only
        return {}



class CheckpointTracking:
    """What both hot-loaders know about real checkpoints: the base's listed info, the
    "Restore original" target, and the current object for a file (refreshes replace them)."""

    original = None

    def _remember_original(self, before, base_info) -> None:
        """The real checkpoint that "Restore original" goes back to: the one loaded before this merge,
        unless that was itself a merge (then the one before the first merge stays)."""
        if before is not None and not host.is_merged_info(before):
            self.original = before
        elif self.original is None:
            self.original = base_info

    @staticmethod
    def _base_info(path: str):
        from modules import sd_models
        real = os.path.realpath(path)
        for info in host.checkpoint_infos():
            if os.path.realpath(info.filename) == real:
                return info
        return sd_models.CheckpointInfo(path)

    @staticmethod
    def _current(info):
        """The listed CheckpointInfo for the same file (refreshes replace the objects)."""
        if info is None:
            return None
        for candidate in host.checkpoint_infos():
            if candidate.filename == info.filename:
                return candidate
        return info

    @staticmethod
    def _write_or_roll_back(write: Callable[[], object], leaf_modules: list, previous,
                            put_back: Callable[[], object]) -> None:
        """Run ``write`` (it writes the merge into the model); if it fails, run ``put_back``.

        Both loaders write weights module by module, so a failure part-way
        (OOM, a bad tensor, the test hook of :data:`FAULTS` armed on
        ``leaf_modules``) leaves a model that is half one checkpoint and half
        another.  ``put_back`` writes the previously loaded weights (those of
        the CheckpointInfo ``previous``) the same way; either way a :class:`HotLoadError` says what happened.  A failure
        before the first write (arming the hook) is raised as it is.
        """
        touched = False
        try:
            hooks = install_module_fault(leaf_modules, FAULTS.take())
            try:
                touched = True
                write()
            finally:
                for handle in hooks:
                    handle.remove()
        except BaseException as exc:
            if not touched:
                raise
            detail = f"{type(exc).__name__}: {exc}"
            try:
                put_back()
            except BaseException as again:
                raise HotLoadError(f"hot-load failed ({detail}) and putting back {previous.title} failed too "
                                   f"({again}); load a checkpoint from the list") from exc
            raise HotLoadError(f"hot-load failed ({detail}); the weights loaded before "
                               f"({previous.title}) were put back") from exc


class Registry:
    """Keeps the loaded merge's CheckpointInfo in the WebUI's checkpoint list.

    ``sd_models.list_models`` clears ``checkpoints_list`` and
    ``checkpoint_aliases`` and re-reads the folders; a merge has no file, so
    it would vanish and the next generation would load a fallback.  The
    wrapper installed here re-registers the merge after every refresh, for
    as long as :meth:`current` says it is loaded.
    """

    def __init__(self) -> None:
        self.info = None
        self._loaded_check = lambda info: True

    def set_loaded_check(self, fn) -> None:
        self._loaded_check = fn

    def current(self):
        info = self.info
        if info is not None and not self._loaded_check(info):
            self.unregister()
            return None
        return info

    def register(self, info) -> None:
        from modules import sd_models
        if self.info is not None and self.info is not info:
            self.unregister()
        self.info = info
        info.register()
        sd_models.checkpoint_aliases[info.title] = info

    def unregister(self) -> None:
        from modules import sd_models
        info, self.info = self.info, None
        if info is None:
            return
        for title, value in list(sd_models.checkpoints_list.items()):
            if value is info:
                del sd_models.checkpoints_list[title]
        for alias, value in list(sd_models.checkpoint_aliases.items()):
            if value is info:
                del sd_models.checkpoint_aliases[alias]

    def reregister(self, selected: str | None = None) -> None:
        """After a refresh: list the loaded merge again, and keep it selected if it was.

        (With ``--ckpt``, A1111's ``list_models`` also resets the selection to
        that file, which would make the next generation load it.)
        """
        info = self.current()
        if info is None:
            return
        info.register()
        if selected == info.title:
            from modules import shared
            shared.opts.data["sd_model_checkpoint"] = info.title

    def install(self) -> None:
        """Wrap ``sd_models.list_models`` once (idempotent across script reloads)."""
        from modules import sd_models
        current = sd_models.list_models
        if getattr(current, "_dare_merge_wrapper", False):
            current._dare_merge_registry = self
            return
        original = current

        def list_models(*args, **kwargs):
            from modules import shared
            selected = shared.opts.data.get("sd_model_checkpoint")
            result = original(*args, **kwargs)
            registry = getattr(list_models, "_dare_merge_registry", None)
            if registry is not None:
                try:
                    registry.reregister(selected)
                except Exception as exc:  # never break the WebUI's refresh
                    print(f"[dare-merge] could not keep the merge in the checkpoint list: {exc}")
            return result

        list_models._dare_merge_wrapper = True
        list_models._dare_merge_original = original
        list_models._dare_merge_registry = self
        sd_models.list_models = list_models

    @staticmethod
    def uninstall() -> None:
        from modules import sd_models
        current = sd_models.list_models
        original = getattr(current, "_dare_merge_original", None)
        if original is not None:
            sd_models.list_models = original


def clear_prompt_cache() -> None:
    """Drop cached conds: they were computed with the old text encoder."""
    from modules import processing
    cls = processing.StableDiffusionProcessing
    for attr in ("cached_c", "cached_uc"):
        current = getattr(cls, attr, None)
        if isinstance(current, list):
            setattr(cls, attr, [None] * len(current))


__all__ = ["merged_info", "Registry", "CheckpointTracking", "HotLoadError", "FAULTS", "fingerprint", "dtype_counts",
           "clear_prompt_cache", "test_hooks_enabled", "InjectedFault", "install_module_fault"]
