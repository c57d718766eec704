"""Keep a merge held in memory out of the WebUI's own checkpoint state (issue 15).

While a merge is in the model, A1111 and Forge must see its title as the
selected checkpoint (``opts.sd_model_checkpoint``), or their next generation
would reload a file.  Everywhere else the title is a trap: the merge has no
file, so a host that later "goes back" to it (the restore after a
per-request checkpoint override, a settings save and restart, the refiner)
tries to read ``<name>.dare-merge-in-memory`` from disk.  The rules here:

- **The selection follows the model.**  When another checkpoint is loaded
  (the user picks one, an override, an X/Y/Z "Checkpoint name" cell), the
  merge leaves the checkpoint list and the status (:func:`on_model_loaded`,
  a ``script_callbacks.on_model_loaded`` handler).
- **A checkpoint override replaces a loaded merge for that image only, and
  the merge's base is what comes back.**  :func:`yield_to_override` runs
  from the section's ``before_process`` (which every generation calls,
  before the host notes the options it restores afterwards), so the host
  restores the base's title, never the merge's.  The merge stays in RAM:
  the tab or the HTTP route hot-load it again without merging.
- **With the DARE Merge section (or a merge axis) on, a checkpoint named for
  that image is the merge's base** (:func:`take_checkpoint_override`): the
  image is still a merge, and its infotext says which base it was built on.
- **Nothing reads a merge as a file.**  ``select_checkpoint`` maps a
  merge's title whose merge is not in the model to its base; A1111's
  ``get_checkpoint_state_dict`` gets the merge's weights from memory when
  they are held (an fp8 switch reloads "from disk"), else a clear error.
- **config.json holds a real checkpoint**: ``opts.save`` writes the merge's
  base title (and hash) where the live options hold the merge's.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Mapping

from . import host
from .hotload_base import HotLoadError

KEY = "sd_model_checkpoint"
HASH_KEY = "sd_checkpoint_hash"

_merge_bases: dict[str, str] = {}     # title of every merge loaded in this process -> its base's title


def log(message: str) -> None:
    print(f"[DARE Merge] {message}", flush=True)


def _loader():
    from . import get_session
    return get_session().hot_loader


def _aliases() -> dict:
    from modules import sd_models
    return sd_models.checkpoint_aliases


def _opts():
    from modules import shared
    return shared.opts


def _is_loaded(info) -> bool:
    if info is None:
        return False
    try:
        return bool(_loader()._info_is_loaded(info))
    except Exception:
        return False


def remember(info, bases: dict[str, str] | None = None) -> None:
    """Note a merge's title and its base's title (kept after the merge is unregistered) in ``bases``
    (default: this process's record)."""
    if host.is_merged_info(info):
        base = info.dare_merge.get("base_title")
        if base:
            (_merge_bases if bases is None else bases)[info.title] = base


# -- the rules as functions of plain values (the host's alias map, its options, flags) ----------------
# ``aliases`` is the host's ``sd_models.checkpoint_aliases`` (title/name/hash -> CheckpointInfo) and
# ``bases`` a record of merge title -> base title; the hooks below read both from the host and call these.

def merge_base_title(title: str | None, aliases: Mapping, bases: dict[str, str]) -> str | None:
    """The base's title when ``title`` names a merge (listed in ``aliases``, or recorded in ``bases``
    from before it was unlisted); else None.  A listed merge is recorded in ``bases``."""
    if not title:
        return None
    info = aliases.get(title)
    if host.is_merged_info(info):
        remember(info, bases)
        return info.dare_merge.get("base_title")
    return bases.get(title)


def real_info(title: str | None, aliases: Mapping):
    """The listed real (not merged) CheckpointInfo for a title, or None."""
    info = aliases.get(title) if title else None
    return None if info is None or host.is_merged_info(info) else info


def persisted_options(data: dict, aliases: Mapping, bases: dict[str, str]) -> dict:
    """``data`` (the host's ``opts.data``) as config.json should hold it: a merge's title becomes its
    base's, with the base's hash (or none).  ``data`` itself is returned when it names no merge."""
    base = merge_base_title(data.get(KEY), aliases, bases)
    if base is None:
        return data
    out = dict(data)
    out[KEY] = base
    sha = getattr(real_info(base, aliases), "sha256", None)
    if sha:
        out[HASH_KEY] = sha
    else:
        out.pop(HASH_KEY, None)
    return out


def base_for_unloaded_merge(selected: str | None, is_loaded: Callable[[object], bool], aliases: Mapping,
                            bases: dict[str, str]):
    """What ``select_checkpoint`` gives instead of the selection: the listed base when ``selected``
    names a merge that is not in the model (``is_loaded(info)`` says whether an info is; it has no file
    to read); None keeps the host's own choice.  ``is_loaded`` is asked only about a merge."""
    base_title = merge_base_title(selected, aliases, bases)
    if base_title is None or is_loaded(aliases.get(selected)):
        return None
    return real_info(base_title, aliases)


def selection_after_load(selected: str | None, loaded, is_loaded: Callable[[object], bool], aliases: Mapping,
                         bases: dict[str, str]) -> str | None:
    """The title the selection must change to after the host loaded the CheckpointInfo ``loaded``:
    its own, when the selection still names a merge that is no longer in the model; else None."""
    if loaded is not None and selected != loaded.title and merge_base_title(selected, aliases, bases) is not None \
            and not is_loaded(aliases.get(selected)):
        return loaded.title
    return None


def base_after_override(override: str | None, selected: str | None, aliases: Mapping, bases: dict[str, str]):
    """A plain generation's checkpoint override while the merge ``selected`` is selected: the merge's
    listed base (what the selection becomes, so the host restores a real file afterwards), or None
    when nothing changes (no override, one the host ignores, one naming a merge, or no merge selected)."""
    if real_info(override, aliases) is None:
        return None
    return real_info(merge_base_title(selected, aliases, bases), aliases)


def take_override(overrides: dict, aliases: Mapping):
    """Remove the checkpoint named in ``overrides`` (a request's ``override_settings``) when the host
    knows it, and return its CheckpointInfo; None when none is named, the host does not know it (left
    in place: the host ignores it too), or it names a merge (removed: the section's merge is used)."""
    value = overrides.get(KEY)
    if value is None:
        return None
    info = aliases.get(value)
    if info is None:
        return None  # the host ignores an override it cannot find; so does the section
    del overrides[KEY]
    if host.is_merged_info(info):
        log(f"this image names the merge {info.title} as its checkpoint; the section's merge is used")
        return None
    return info


def merge_state_dict(checkpoint_info, registered, loaded_state: dict | None) -> dict:
    """A merge's state dict for A1111's ``get_checkpoint_state_dict``: a copy of the weights held in
    memory when ``checkpoint_info`` is the merge registered now (``registered``), else a clear error."""
    if loaded_state is not None and registered is checkpoint_info:
        print(f"[DARE Merge] loading the merge {checkpoint_info.title} from memory")
        return dict(loaded_state)
    raise HotLoadError(f"{checkpoint_info.title} is a merge held in memory that is no longer loaded, so there "
                       "is no file to read; pick a real checkpoint, or hot-load the merge again")


# -- the same, reading the host ------------------------------------------------------------------------

def base_title_of(title: str | None) -> str | None:
    """The base's title when ``title`` names a merge (listed or not any more); else None."""
    if not title:
        return None
    return merge_base_title(title, _aliases(), _merge_bases)


def _real_info(title: str | None):
    """The listed real CheckpointInfo for a title, or None."""
    return real_info(title, _aliases()) if title else None


def persisted(data: dict) -> dict:
    """``opts.data`` as it should be written to config.json: a merge's title becomes its base's."""
    if not data.get(KEY):
        return data
    return persisted_options(data, _aliases(), _merge_bases)


# -- hooks -------------------------------------------------------------------------------

def on_model_loaded(model) -> None:
    """``script_callbacks.on_model_loaded``: drop a merge that is no longer in the model from the
    checkpoint list and the status, and never leave the selection on it."""
    info = getattr(model, "sd_checkpoint_info", None)
    try:
        from . import get_session
        session = get_session()
    except Exception:
        return
    loader = session.hot_loader
    remember(info)
    registry = getattr(loader, "registry", None)
    merged = getattr(registry, "info", None)
    if merged is not None and merged is not info and not _is_loaded(merged):
        remember(merged)
        registry.unregister()
        if not host.is_merged_info(info):
            log(f"{getattr(info, 'title', 'another checkpoint')} is loaded; the merge {merged.title} is no longer "
                "in the model (it stays in memory: hot-load it again from the tab or the HTTP route)")
    session.hot_loaded = loader.loaded_recipe_hash() is not None
    opts = _opts()
    selected = opts.data.get(KEY)
    if info is None or selected == info.title or not selected:
        return
    title = selection_after_load(selected, info, _is_loaded, _aliases(), _merge_bases)
    if title is not None:
        opts.data[KEY] = title


def yield_to_override(p) -> None:
    """A plain generation (no merge) that names a checkpoint while a merge is loaded: from now on the
    selection is the merge's base, so the options the host restores afterwards name a real file."""
    override = (getattr(p, "override_settings", None) or {}).get(KEY)
    if not override:
        return
    aliases = _aliases()
    named = real_info(override, aliases)
    if named is None:
        return       # one the host will ignore, or the merge itself
    opts = _opts()
    selected = opts.data.get(KEY)
    base = base_after_override(override, selected, aliases, _merge_bases)
    if base is None:
        return       # no merge selected
    opts.data[KEY] = base.title
    log(f"this image names the checkpoint {named.title}, which replaces the merge {selected}; "
        f"afterwards its base {base.title} is selected (the merge stays in memory)")
    if host.detect() == host.FORGE:
        from modules_forge import main_entry
        main_entry.refresh_model_loading_parameters()     # Forge loads what the parameters say, not opts


def take_checkpoint_override(p):
    """The real checkpoint this image names (``override_settings``: the request's, the X/Y/Z
    "Checkpoint name" axis', a pasted Model hash), removed from the overrides so the host does not
    load it over the merge; None when there is none.  An override naming a merge is dropped."""
    overrides = getattr(p, "override_settings", None)
    if not overrides or overrides.get(KEY) is None:
        return None
    return take_override(overrides, _aliases())


def pin_loaded_merge() -> None:
    """Forge: after the section's merge is in the model, make the loading parameters name it again.

    Forge's X/Y/Z "Checkpoint name" axis points them at the cell's checkpoint
    before ``before_process``; when that cell's merge was loaded already
    (nothing to hot-load), Forge would otherwise load the checkpoint's file
    over the merge and the image would not be the one its infotext names.
    """
    if host.detect() != host.FORGE:
        return
    from modules import sd_models
    data = sd_models.model_data
    info = getattr(data.sd_model, "sd_checkpoint_info", None)
    params = data.forge_loading_parameters
    if not host.is_merged_info(info) or not isinstance(params, dict) or params.get("checkpoint_info") is info:
        return
    data.forge_loading_parameters = dict(params, checkpoint_info=info)
    _opts().data[KEY] = info.title


def install() -> None:
    """Wrap ``select_checkpoint`` (both hosts), A1111's ``get_checkpoint_state_dict`` and
    ``opts.save`` once (idempotent across script reloads)."""
    from modules import sd_models
    _wrap(sd_models, "select_checkpoint", _select_checkpoint)
    if host.detect() == host.A1111:
        _wrap(sd_models, "get_checkpoint_state_dict", _get_checkpoint_state_dict)
    opts = _opts()
    current = opts.save
    if not getattr(current, "_dare_merge_original", None):
        def save(filename, *args, **kwargs):
            return _save(current, filename, *args, **kwargs)
        save._dare_merge_original = current
        object.__setattr__(opts, "save", save)


def uninstall() -> None:
    from modules import sd_models
    for name in ("select_checkpoint", "get_checkpoint_state_dict"):
        original = getattr(getattr(sd_models, name, None), "_dare_merge_original", None)
        if original is not None:
            setattr(sd_models, name, original)
    opts = _opts()
    if getattr(opts.save, "_dare_merge_original", None) is not None:
        object.__delattr__(opts, "save")


def _wrap(module, name: str, make) -> None:
    current = getattr(module, name, None)
    if current is None or getattr(current, "_dare_merge_original", None) is not None:
        return
    wrapper = make(current)
    wrapper._dare_merge_original = current
    setattr(module, name, wrapper)


def _select_checkpoint(original):
    def select_checkpoint(*args, **kwargs):
        opts = _opts()
        selected = opts.data.get(KEY)
        if selected:
            base = base_for_unloaded_merge(selected, _is_loaded, _aliases(), _merge_bases)
            if base is not None:
                log(f"the merge {selected} is no longer in the model and has no file; selecting its base "
                    f"{base.title}")
                opts.data[KEY] = base.title
                return base
        return original(*args, **kwargs)
    return select_checkpoint


def _get_checkpoint_state_dict(original):
    def get_checkpoint_state_dict(checkpoint_info, timer, *args, **kwargs):
        if not host.is_merged_info(checkpoint_info):
            return original(checkpoint_info, timer, *args, **kwargs)
        loader = _loader()
        return merge_state_dict(checkpoint_info, getattr(loader.registry, "info", None),
                                getattr(loader, "loaded_state", None))
    return get_checkpoint_state_dict


def _save(original, filename, *args, **kwargs):
    opts = _opts()
    data = opts.data
    view = persisted(data)
    if view is data:
        return original(filename, *args, **kwargs)
    try:  # the host's own Options.save, on the same data with the merge's title replaced
        return type(opts).save(SimpleNamespace(data=view), filename, *args, **kwargs)
    except AttributeError:
        log("could not write config.json with the merge's base; writing the options as they are")
        return original(filename, *args, **kwargs)


__all__ = ["on_model_loaded", "yield_to_override", "take_checkpoint_override", "pin_loaded_merge", "persisted",
           "base_title_of", "install", "uninstall", "remember", "merge_base_title", "real_info",
           "persisted_options", "base_for_unloaded_merge", "selection_after_load", "base_after_override",
           "take_override", "merge_state_dict"]
