"""Hot-load on AUTOMATIC1111 1.10: swap merged weights into the running model in place.

Design (why not ``load_model(already_loaded_state_dict=...)``): that path
throws the running model away (to the meta device) before it builds a new
one, so a failure half-way leaves no model to go back to, and with
lowvram/medvram it is the origin of the "Cannot copy out of meta tensor"
reports other mergers have.  Instead this loader walks the exact steps A1111
itself takes when the user switches between two checkpoints of the same
architecture (``reload_model_weights``'s in-place branch)::

    sd_unet.apply_unet("None"); send_model_to_cpu; model_hijack.undo_hijack
    load_model_weights(model, <merge's CheckpointInfo>, <merged state dict>)
    model_hijack.hijack; model.to(device) unless lowvram; model_loaded_callback
    model_data.set_sd_model; sd_unet.apply_unet()

``load_model_weights`` is A1111's own: it copies through
``model.load_state_dict`` (the Lora extension patches every module's
``_load_from_state_dict`` to drop ``network_weights_backup`` /
``network_bias_backup``, so a later LoRA change cannot write stale weights
back), then applies ``--no-half``/half, ``--no-half-vae``,
``--upcast-sampling``, fp8 storage with its fp16 caches, the VAE choice and
the alpha schedule exactly as for a checkpoint read from disk, and sets
``sd_model_hash``/``sd_checkpoint_info``/``opts.sd_model_checkpoint``.
lowvram/medvram hooks stay on the modules, whose weights are on the CPU while
they are written.  The merge's CheckpointInfo is a new object (see
:func:`.hotload_base.merged_info`), which invalidates the prompt cache; the class
level cond cache and the model's empty-prompt cond are recomputed too.

If anything fails after the first weight was written, the weights that were
loaded before are put back the same way (from the previous merge's state
dict, or from the previous checkpoint's file) and a :class:`HotLoadError`
says so.  A merge whose config (architecture) differs from the loaded
model's first switches to its base checkpoint with A1111's own
``reload_model_weights``, then loads in place.
"""
from __future__ import annotations

import os
import threading
from typing import Callable

import torch

from ..errors import MergeError
from . import host
from .hotload_base import (CheckpointTracking, HotLoadError, Registry, clear_prompt_cache, dtype_counts, fingerprint,
                           merged_info, recipe_doc)


class A1111HotLoader(CheckpointTracking):
    """``lib_merge.session.HotLoader`` for AUTOMATIC1111 1.10."""

    def __init__(self) -> None:
        self.registry = Registry()
        self.registry.set_loaded_check(self._info_is_loaded)
        self.original = None          # the real checkpoint to go back to
        self.loaded_state = None      # state dict of the merge now in the model
        self.lock = threading.RLock()

    # -- queries
    @staticmethod
    def _model():
        from modules import sd_models
        return sd_models.model_data.sd_model

    @staticmethod
    def _info_is_loaded(info) -> bool:
        from modules import sd_models
        data = sd_models.model_data
        models = [data.sd_model, *getattr(data, "loaded_sd_models", [])]
        return any(m is not None and getattr(m, "sd_checkpoint_info", None) is info for m in models)

    def loaded_recipe_hash(self) -> str | None:
        """Recipe hash of the merge in the running model, if one is."""
        model = self._model()
        info = getattr(model, "sd_checkpoint_info", None)
        return info.dare_merge["recipe_hash"] if host.is_merged_info(info) else None

    def loaded_title(self) -> str | None:
        info = getattr(self._model(), "sd_checkpoint_info", None)
        return getattr(info, "title", None)

    def fingerprints(self) -> dict[str, str]:
        """sha256 of the running model's parameters, and of its buffers (schedule tensors)."""
        model = self._model()
        if model is None:
            raise MergeError("no model is loaded")
        return {"params": fingerprint(model.named_parameters()), "buffers": fingerprint(model.named_buffers())}

    def storage(self) -> dict:
        """Parameter dtypes and the lowvram/medvram flag of the running model."""
        model = self._model()
        if model is None:
            return {}
        return {"dtypes": dtype_counts(model.named_parameters()), "lowvram": bool(getattr(model, "lowvram", False))}

    # -- HotLoader
    def load(self, state: dict[str, torch.Tensor], name: str, recipe_hash: str, recipe) -> None:
        from modules import sd_models, sd_models_config, shared
        with self.lock:
            self.registry.install()
            base_info = self._base_info(recipe.base)
            state = sd_models.get_state_dict_from_checkpoint(dict(state))  # A1111's key fix-ups, on a copy
            config = sd_models_config.find_checkpoint_config(state, base_info)
            model = shared.sd_model  # waits for a model still loading at startup
            before = getattr(model, "sd_checkpoint_info", None)
            if model is None or getattr(model, "used_config", None) != config:
                self._switch_to(base_info, model)
                model = self._model()
                if model is None or getattr(model, "used_config", None) != config:
                    raise HotLoadError(f"could not load the base checkpoint {base_info.title} to hot-load into")
            prev_info = model.sd_checkpoint_info
            prev_state = self.loaded_state if host.is_merged_info(prev_info) else None
            info = merged_info(base_info, name, recipe_hash, recipe_doc(recipe), host.models_dir())
            misplaced = self._swap(model, info, state, prev_info, prev_state)
            self._remember_original(before, base_info)
            self.loaded_state = state
            self.registry.register(info)
            if misplaced is not None:
                raise HotLoadError(misplaced)

    def restore(self) -> str:
        from modules import sd_models, shared
        with self.lock:
            original = self._current(self.original)
            if original is None:
                raise MergeError("nothing to restore: no merge has been hot-loaded in this session")
            if not os.path.exists(original.filename):
                raise MergeError("the checkpoint that was loaded before the merge is gone", original.filename)
            model = self._model()
            if model is None or getattr(model.sd_checkpoint_info, "filename", None) != original.filename \
                    or host.is_merged_info(model.sd_checkpoint_info):
                sd_models.reload_model_weights(info=original)
                model = self._model()
            self._drop_other_merged_models(model)
            self.registry.unregister()
            self.loaded_state = None
            shared.opts.data["sd_model_checkpoint"] = original.title
            self._after_weights_changed(model)
            return original.title

    # -- steps
    def _switch_to(self, info, model) -> None:
        """Load a real checkpoint with A1111's own code (architecture change, or no model)."""
        from modules import sd_models
        sd_models.reload_model_weights(info=info)
        self.loaded_state = None

    def _swap(self, model, info, state, prev_info, prev_state) -> str | None:
        """Write ``state`` in place; returns None, or the line saying the model could not go back
        to the WebUI's device (it is then wholly on the CPU, see :func:`_to_device`)."""
        from modules import devices, script_callbacks, sd_hijack, sd_models, sd_unet
        from modules.timer import Timer
        timer = Timer()
        misplaced = None
        sd_unet.apply_unet("None")
        sd_models.send_model_to_cpu(model)
        sd_hijack.model_hijack.undo_hijack(model)
        try:
            self._preflight(model, state)
            self._write_or_roll_back(lambda: sd_models.load_model_weights(model, info, state, timer),
                                     _leaf_modules(model), prev_info,
                                     lambda: sd_models.load_model_weights(model, prev_info, prev_state, timer))
        finally:
            sd_models.checkpoints_loaded.pop(info, None)  # never cache a merge as if it were a file
            sd_hijack.model_hijack.hijack(model)
            if not getattr(model, "lowvram", False):
                misplaced = _to_device(model, devices.device, devices.cpu,
                                       lambda: host.free_vram(str(devices.device)))
                if misplaced is not None:
                    print(f"[dare-merge] {misplaced}", flush=True)
            script_callbacks.model_loaded_callback(model)
            sd_models.model_data.set_sd_model(model)
            sd_unet.apply_unet()
            self._after_weights_changed(model)
        return misplaced

    @staticmethod
    def _preflight(model, state) -> None:
        """Refuse before writing anything when the merge does not fit the loaded model."""
        own = model.state_dict()
        common = [k for k in state if k in own]
        for key in common:
            if tuple(own[key].shape) != tuple(state[key].shape):
                raise HotLoadError(f"shape {list(state[key].shape)} does not fit the loaded model's "
                                   f"{list(own[key].shape)}", key=key)
        params = [k for k, _ in model.named_parameters()]
        covered = sum(1 for k in params if k in state)
        if not params or covered < 0.9 * len(params):
            raise HotLoadError(f"the merge covers only {covered} of the loaded model's {len(params)} "
                               "parameters; it is not the same architecture")

    @staticmethod
    def _after_weights_changed(model) -> None:
        from modules import devices, sd_models
        clear_prompt_cache()
        if model is None:
            return
        try:
            with devices.autocast(), torch.no_grad():
                model.cond_stage_model_empty_prompt = sd_models.get_empty_cond(model)
        except Exception as exc:  # only used for an optional sampler shortcut
            print(f"[dare-merge] could not recompute the empty-prompt cond: {exc}")

    @staticmethod
    def _drop_other_merged_models(keep) -> None:
        """With sd_checkpoints_limit > 1 a merged model may linger in memory; free it."""
        from modules import sd_models
        data = sd_models.model_data
        for m in list(getattr(data, "loaded_sd_models", [])):
            if m is not keep and host.is_merged_info(getattr(m, "sd_checkpoint_info", None)):
                data.loaded_sd_models.remove(m)
                sd_models.send_model_to_trash(m)


def _to_device(model: torch.nn.Module, device, fallback, free: Callable[[], object]) -> str | None:
    """``model.to(device)`` as one step that never leaves the model split across devices.

    ``Module.to`` moves parameter after parameter; running out of memory
    part-way leaves some on the GPU and the rest on the CPU, and no generation
    can run like that.  So on failure everything goes back to ``fallback``
    (the CPU, where the swap put it), ``free`` gives back the VRAM the
    extension holds (the X/Y/Z input cache, torch's cached blocks) and the
    move is tried once more.  Returns None when the model is on ``device``,
    else one line saying that all of it is on ``fallback`` and what to do.
    """
    try:
        model.to(device)
        return None
    except Exception as exc:
        first = exc
    for attempt in (1, 2):
        try:
            model.to(fallback)
        except Exception as exc:
            return (f"the model could not be moved to {device} ({_first_line(first)}) nor back to {fallback} "
                    f"({_first_line(exc)}); load a checkpoint from the list")
        if attempt == 2:
            break
        try:
            free()
            model.to(device)
            return None
        except Exception as exc:
            first = exc
    return (f"the merged weights are loaded, but moving the model to {device} failed ({_first_line(first)}); "
            f"all of it is on {fallback} now, not split. Free VRAM (set 'X/Y/Z merge input cache on the GPU' "
            "to 0, close other GPU programs) or start the WebUI with --medvram, then load a checkpoint")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def _leaf_modules(model) -> list:
    """Modules that own parameters, in ``load_state_dict`` order (for the fault hook)."""
    return [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]


__all__ = ["A1111HotLoader"]
