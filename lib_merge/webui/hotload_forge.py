"""Hot-load on Forge 2: write merged weights into the objects Forge's backend built.

Forge's ``sd_models.load_model``/``reload_model_weights`` are stubs; a model
is ``backend.loader.forge_loader(<path>)`` run by ``forge_model_reload()``
whenever ``str(model_data.forge_loading_parameters)`` differs from
``model_data.forge_hash``.  It cannot take a state dict, and building a new
engine would throw the running one away first (no way back on failure).  So
this loader:

1. splits the merged LDM-layout state dict into Forge's components with
   Forge's own functions, in the order ``backend.loader.split_state_dict``
   uses (``preprocess_state_dict``, ``huggingface_guess.guess``,
   ``process_vae_state_dict``, ``try_filter_state_dict`` with the guess's
   prefixes, ``process_clip_state_dict``): the UNet keys lose
   ``model.diffusion_model.``, the VAE keys ``first_stage_model.``, and
   ``cond_stage_model.transformer.text_model.*`` becomes ``clip_l.*`` — the
   HF CLIPTextModel layout Forge's ``JointTextEncoder`` holds;
2. checks every tensor's shape against the running model and refuses
   quantized (nf4/fp4/gguf) storage before anything is written;
3. puts LoRA-patched weights back first (``lora_loader.refresh({},
   force_refresh=True)`` on the UNet and the text encoder: it restores the
   backed-up originals and empties the backup, so no stale weight can be
   written back later), then loads each component through
   ``module.load_state_dict`` under ``torch.inference_mode`` (Forge's tensors
   are inference tensors), which casts into the storage dtype (fp32/fp16/
   bf16/fp8) exactly as Forge's own loader does, on whatever device the
   memory manager has the weights;
4. gives the model a new CheckpointInfo (infotext, prompt cache), resets
   ``current_lora_hash`` so the LoRA extension re-applies LoRAs onto the new
   weights, and sets ``forge_loading_parameters['checkpoint_info']`` plus
   ``forge_hash`` to match, so ``forge_model_reload`` sees nothing to do.

On failure after the first write, the previous weights are written back the
same way (previous merge's state dict, or the previous checkpoint's file).
If the loading parameters later change for another reason (UNet storage
dtype, additional modules), a guard on ``forge_model_reload`` swaps the
merge's CheckpointInfo for its base's, so Forge reloads the base from disk
instead of failing on a file that does not exist.  "Restore" reads the
original checkpoint's file into the same modules the same way (a full
``forge_model_reload`` when the architecture differs or additional
VAE/text-encoder modules are selected).
"""
from __future__ import annotations

import os
import threading

import torch

from ..errors import MergeError
from . import host
from .hotload_base import (CheckpointTracking, HotLoadError, Registry, clear_prompt_cache, dtype_counts, fingerprint,
                           merged_info, recipe_doc)

QUANTIZED = ("nf4", "fp4", "gguf")


class ForgeHotLoader(CheckpointTracking):
    """``lib_merge.session.HotLoader`` for Forge 2 (``f2.*``)."""

    def __init__(self) -> None:
        self.registry = Registry()
        self.registry.set_loaded_check(self._info_is_loaded)
        self.original = None
        self.loaded_state = None
        self.lock = threading.RLock()

    # -- queries
    @staticmethod
    def _model():
        from modules import sd_models
        model = sd_models.model_data.sd_model
        return model if getattr(model, "forge_objects", None) is not None else None

    def _info_is_loaded(self, info) -> bool:
        return getattr(self._model(), "sd_checkpoint_info", None) is info

    def loaded_recipe_hash(self) -> str | None:
        info = getattr(self._model(), "sd_checkpoint_info", None)
        return info.dare_merge["recipe_hash"] if host.is_merged_info(info) else None

    def loaded_title(self) -> str | None:
        return getattr(getattr(self._model(), "sd_checkpoint_info", None), "title", None)

    def fingerprints(self) -> dict[str, str]:
        """sha256 of the running UNet/VAE/text encoders' parameters, and of their buffers."""
        model = self._model()
        if model is None:
            raise MergeError("no model is loaded")
        params, buffers = [], []
        for prefix, module in _components(model).items():
            params += [(f"{prefix}.{k}", v) for k, v in module.named_parameters()]
            buffers += [(f"{prefix}.{k}", v) for k, v in module.named_buffers()]
        return {"params": fingerprint(params), "buffers": fingerprint(buffers)}

    def storage(self) -> dict:
        """Parameter dtypes per component of the running model (fp8/fp16 storage must survive)."""
        model = self._model()
        if model is None:
            return {}
        return {"dtypes": {part: dtype_counts(module.named_parameters())
                           for part, module in _components(model).items()}}

    # -- HotLoader
    def load(self, state: dict[str, torch.Tensor], name: str, recipe_hash: str, recipe) -> None:
        with self.lock:
            self.install()
            base_info = self._base_info(recipe.base)
            parts, guess = split_for_forge(state)
            model = self._model()
            before = getattr(model, "sd_checkpoint_info", None)
            if model is None or type(getattr(model, "model_config", None)) is not type(guess):
                self._switch_to(base_info, model)
                model = self._model()
                if model is None or type(getattr(model, "model_config", None)) is not type(guess):
                    raise HotLoadError(f"could not load the base checkpoint {base_info.title} to hot-load into")
            targets = _targets(model, parts)
            prev_info = model.sd_checkpoint_info
            prev_state = self.loaded_state if host.is_merged_info(prev_info) else None
            info = merged_info(base_info, name, recipe_hash, recipe_doc(recipe), host.models_dir())
            self._swap(model, targets, prev_info, prev_state)
            self._remember_original(before, base_info)
            self.loaded_state = state
            self._adopt(model, info)

    def restore(self) -> str:
        """Put the original checkpoint back: read from its file into the same modules when the
        architecture matches and no additional modules (VAE/TE files) are selected, else a full
        ``forge_model_reload`` from disk."""
        from modules import sd_models
        with self.lock:
            original = self._current(self.original)
            if original is None:
                raise MergeError("nothing to restore: no merge has been hot-loaded in this session")
            if not os.path.exists(original.filename):
                raise MergeError("the checkpoint that was loaded before the merge is gone", original.filename)
            model = self._model()
            data = sd_models.model_data
            params = dict(data.forge_loading_parameters or {})
            in_place = (model is not None and host.is_merged_info(model.sd_checkpoint_info)
                        and not params.get("additional_modules"))
            if in_place:
                parts, guess = split_for_forge(_read_file(original.filename))
                in_place = type(getattr(model, "model_config", None)) is type(guess)
            if in_place:
                targets = _targets(model, parts)
                _release_loras(model)
                _write(targets)
                model.current_lora_hash = str([])
                self._adopt(model, original)
            elif model is None or model.sd_checkpoint_info is not original:
                params["checkpoint_info"] = original
                data.forge_loading_parameters = params
                data.forge_hash = ""      # force: the weights in memory are not the file's
                from modules import shared
                shared.opts.data["sd_model_checkpoint"] = original.title
                sd_models.forge_model_reload()
            self.registry.unregister()
            self.loaded_state = None
            clear_prompt_cache()
            return original.title

    # -- steps
    def _switch_to(self, info, model) -> None:
        """Load a real checkpoint through Forge's loader (no model yet, or another architecture)."""
        from modules import sd_models, shared
        data = sd_models.model_data
        params = dict(data.forge_loading_parameters or {})
        if not params:
            from modules_forge import main_entry
            main_entry.refresh_model_loading_parameters()
            params = dict(data.forge_loading_parameters)
        params["checkpoint_info"] = info
        data.forge_loading_parameters = params
        shared.opts.data["sd_model_checkpoint"] = info.title
        sd_models.forge_model_reload()
        self.loaded_state = None

    def _swap(self, model, targets, prev_info, prev_state) -> None:
        def put_back() -> None:
            previous = prev_state if prev_state is not None else _read_file(prev_info.filename)
            _write(_targets(model, split_for_forge(previous)[0]))

        try:
            _release_loras(model)
            self._write_or_roll_back(lambda: _write(targets), _leaf_modules([m for m, _ in targets]), prev_info,
                                     put_back)
        finally:
            model.current_lora_hash = str([])
            clear_prompt_cache()

    def _adopt(self, model, info) -> None:
        """Make Forge see ``info`` (a merge, or a real checkpoint written in place) as the loaded
        checkpoint, with ``forge_hash`` matching so ``forge_model_reload`` does nothing."""
        from modules import script_callbacks, sd_models, shared
        merged = host.is_merged_info(info)
        model.sd_checkpoint_info = info
        model.filename = info.filename
        model.sd_model_hash = info.shorthash if merged else info.calculate_shorthash()
        shared.opts.data["sd_checkpoint_hash"] = info.sha256
        shared.opts.data["sd_model_checkpoint"] = info.title
        if merged:
            self.registry.register(info)
        data = sd_models.model_data
        params = dict(data.forge_loading_parameters or {})
        params["checkpoint_info"] = info
        data.forge_loading_parameters = params
        data.forge_hash = str(params)
        script_callbacks.model_loaded_callback(model)

    def install(self) -> None:
        self.registry.install()
        _install_reload_guard()


# -- state dict -> Forge components ------------------------------------------------------

def split_for_forge(state: dict[str, torch.Tensor]):
    """LDM-layout state dict -> {component: state dict in Forge's key layout}, and the guess."""
    import huggingface_guess
    from backend import loader
    from backend.state_dict import try_filter_state_dict
    sd = loader.preprocess_state_dict(dict(state))
    guess = huggingface_guess.guess(sd)
    clip_target = guess.clip_target(sd)
    sd = guess.process_vae_state_dict(sd)
    parts = {"unet": try_filter_state_dict(sd, guess.unet_key_prefix),
             "vae": try_filter_state_dict(sd, guess.vae_key_prefix)}
    sd = guess.process_clip_state_dict(sd)
    for clip_name in clip_target:
        parts["clip." + clip_name] = try_filter_state_dict(sd, [clip_name + "."])
    return parts, guess


def _components(model) -> dict[str, torch.nn.Module]:
    objects = model.forge_objects_original or model.forge_objects
    out = {"unet": objects.unet.model.diffusion_model, "vae": objects.vae.first_stage_model}
    for clip_name, encoder in objects.clip.cond_stage_model.named_children():
        out["clip." + clip_name] = encoder
    return out


def _targets(model, parts) -> list[tuple[torch.nn.Module, dict[str, torch.Tensor]]]:
    """Pair each component's state with the running module; refuse what cannot be written."""
    components = _components(model)
    out = []
    for part, sd in parts.items():
        if not sd:
            continue
        module = components.get(part)
        if module is None:
            raise HotLoadError(f"the running model has no {part} to load the merge's {len(sd)} keys into")
        own = module.state_dict(keep_vars=True)
        for key, value in sd.items():
            current = own.get(key)
            if current is None:
                continue
            if getattr(current, "bnb_quantized", None) is not None or getattr(current, "gguf_cls", None) is not None:
                raise HotLoadError("the running UNet is stored quantized (nf4/fp4/gguf); hot-loading into it is "
                                   "not supported: save the merge and load the file instead", key=f"{part}.{key}")
            if tuple(current.shape) != tuple(value.shape):
                raise HotLoadError(f"shape {list(value.shape)} does not fit the loaded model's "
                                   f"{list(current.shape)}", key=f"{part}.{key}")
        covered = sum(1 for k, _ in module.named_parameters() if k in sd)
        total = sum(1 for _ in module.named_parameters())
        if total and covered < 0.9 * total:
            raise HotLoadError(f"the merge covers only {covered} of {total} parameters of the running {part}; "
                               "it is not the same architecture")
        out.append((module, sd))
    if not out:
        raise HotLoadError("nothing in the merge matches the running model")
    return out


def _release_loras(model) -> None:
    """Put LoRA-patched weights back to the originals and forget the backup."""
    objects = model.forge_objects_original or model.forge_objects
    with torch.inference_mode():
        for patcher in (objects.unet, getattr(objects.clip, "patcher", None)):
            loader = getattr(patcher, "lora_loader", None)
            if loader is not None:
                loader.refresh(lora_patches={}, offload_device=getattr(patcher, "offload_device", torch.device("cpu")),
                               force_refresh=True)


def _write(targets) -> None:
    with torch.inference_mode():
        for module, sd in targets:
            module.load_state_dict(sd, strict=False)


def _read_file(path: str) -> dict[str, torch.Tensor]:
    from backend.utils import load_torch_file
    return load_torch_file(path)


def _leaf_modules(modules) -> list:
    out = []
    for root in modules:
        out += [m for m in root.modules() if any(True for _ in m.parameters(recurse=False))]
    return out


def _install_reload_guard() -> None:
    """If the loading parameters change while a merge is loaded, reload its base, not a missing file."""
    from modules import processing, sd_models
    current = sd_models.forge_model_reload
    if getattr(current, "_dare_merge_wrapper", False):
        return
    original = current

    def forge_model_reload(*args, **kwargs):
        data = sd_models.model_data
        params = data.forge_loading_parameters or {}
        info = params.get("checkpoint_info") if isinstance(params, dict) else None
        if host.is_merged_info(info) and str(params) != data.forge_hash:
            base = getattr(info, "dare_merge_base", None)
            if base is not None:
                from modules import shared
                print(f"[dare-merge] loading parameters changed; the in-memory merge {info.title} is replaced "
                      f"by its base {base.title}")
                data.forge_loading_parameters = dict(params, checkpoint_info=base)
                shared.opts.data["sd_model_checkpoint"] = base.title
        return original(*args, **kwargs)

    forge_model_reload._dare_merge_wrapper = True
    forge_model_reload._dare_merge_original = original
    sd_models.forge_model_reload = forge_model_reload
    if getattr(processing, "forge_model_reload", None) is original:
        processing.forge_model_reload = forge_model_reload


def uninstall_reload_guard() -> None:
    from modules import processing, sd_models
    current = sd_models.forge_model_reload
    original = getattr(current, "_dare_merge_original", None)
    if original is None:
        return
    sd_models.forge_model_reload = original
    if getattr(processing, "forge_model_reload", None) is current:
        processing.forge_model_reload = original


__all__ = ["ForgeHotLoader", "split_for_forge", "uninstall_reload_guard"]
