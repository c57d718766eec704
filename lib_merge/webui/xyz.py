"""Merge knobs on the built-in X/Y/Z plot, and the "DARE Merge" section of txt2img/img2img.

``scripts/dare_merge_xyz.py`` holds only the section's ``scripts.Script``
subclass and wires the callbacks below; the logic is here, importable
without a WebUI (the host's ``modules`` are imported inside functions), and
the recipe for a cell and the after-grid choice are tested in
``tests/test_webui_xyz_logic.py``.

- **Axes.**  ``lib_merge.xyz_axes.AXES`` become ``xyz_grid.AxisOption`` s
  (:func:`register_axes`).  The script calls it when it is executed *and*
  from ``on_before_ui``: with ``--nowebui`` the API builds the scripts'
  controls (which index the axis list) before ``on_before_ui`` runs, and
  ``xyz_grid.py`` is loaded before any extension, so the import-time add is
  the one that counts there; the callback covers a WebUI that loads scripts
  in another order.  A label check keeps them from being added twice (also
  across "Reload UI").  An axis only records its value on the cell's ``p``
  (``p.dare_merge_xyz``).
- **The section.**  An always-visible script, collapsed and off unless
  ticked (its controls: :mod:`.xyz_section`).  :func:`before_process` (run
  for every image, and for every X/Y/Z cell, before the WebUI loads weights)
  builds the effective recipe (:func:`cell_recipe`: the section's controls or
  the tab's current recipe, with the cell's axis values put in) and hot-loads
  it through ``lib_merge.webui.hot_load_recipe``, which merges only when the
  recipe hash differs from the loaded merge.  The inputs are read through the
  input cache (:mod:`.xyz_cache`), so a cell after the first costs kernel
  time.  The recipe goes into the image's infotext; pasting it back
  (:func:`on_infotext_pasted`) sets the section's controls again.  Disabled
  and with no axis, it does nothing at all.
- **After the grid.**  ``xyz_grid.draw_xyz_grid`` is wrapped
  (:func:`wrap_draw`) so that, once a grid that merged is done, the model is
  what Settings > DARE Merge asks for: the last merge kept, or what was
  loaded before the grid put back (:func:`after_grid_step` decides,
  :func:`after_grid` acts).
"""
from __future__ import annotations

import collections
import dataclasses
import os
import time

from .. import webui as dare_merge
from ..input_cache import session_reads_from
from ..lora.listing import base_choices, resolve_pasted_names
from ..recipe import MergeRecipe
from ..xyz_axes import (AXES, AXES_BY_FIELD, INFOTEXT_KEYS, LABEL_PREFIX, apply_overrides, has_recipe,
                        recipe_fields_from_infotext, recipe_infotext, resolve_names, split_csv, with_override)
from . import host
from . import xyz_cache
from .xyz_cache import OPT_CACHE_GPU_MB, cache_stats, drop_cache, input_cache

XYZ_ATTR = "dare_merge_xyz"
OPT_AFTER_GRID = "dare_merge_xyz_after_grid"
AFTER_RESTORE = "restore what was loaded before the grid"
AFTER_KEEP = "keep the last merge"
ROUTE = "/dare-merge/v1/xyz"
PASTED_BASE = "DARE base title"      # filled by on_infotext_pasted for the section's dropdowns
PASTED_MODELS = "DARE model titles"

# after_grid_step's answers
STEP_NONE = "nothing"                 # no cell merged, or the setting keeps the last merge
STEP_UNCHANGED = "unchanged"          # what was loaded before the grid is loaded again already
STEP_RESTORE = "restore"              # a real checkpoint was loaded before: the loader's restore()
STEP_RELOAD = "reload"                # a merge was loaded before and is still in RAM: load it back
STEP_CANNOT = "cannot"                # a merge was loaded before but is no longer in memory


def log(message: str) -> None:
    print(f"[DARE Merge] {message}", flush=True)


def checkpoint_titles() -> list[str]:
    """The WebUI's checkpoint titles, then its LoRAs ("LoRA: name"); [] when the list cannot be read."""
    try:
        return host.checkpoint_titles() + host.lora_titles()
    except Exception:
        return []


# ----------------------------------------------------------------------------- grids

class GridRun:
    """One X/Y/Z plot run: what was loaded before it, and whether any cell merged."""

    def __init__(self) -> None:
        session = dare_merge.get_session()
        loader = session.hot_loader
        self.loaded_hash = loader.loaded_recipe_hash()
        result = session.result
        self.loaded_result = result if (result is not None and result.recipe_hash == self.loaded_hash) else None
        self.tab_recipe = tab_recipe()
        self.merges_at_start = session.merges_performed
        self.touched = False
        self.started = time.time()


_grid: GridRun | None = None
_last_grid: dict = {}
_own_hashes: collections.deque = collections.deque(maxlen=512)
_tab_recipe: MergeRecipe | None = None


def tab_recipe() -> MergeRecipe | None:
    """The recipe last merged by the tab or the HTTP route (not by this module's cells)."""
    global _tab_recipe
    if _grid is not None:
        return _grid.tab_recipe
    result = dare_merge.get_session().result
    if result is not None and result.recipe_hash not in _own_hashes:
        _tab_recipe = result.recipe
    return _tab_recipe


def after_grid_step(action: str, touched: bool, loaded_now: str | None, loaded_before: str | None,
                    kept_before: bool) -> str:
    """What to do once a grid is over (one of the ``STEP_*`` names).

    ``action`` is the setting (:data:`AFTER_RESTORE` or :data:`AFTER_KEEP`),
    ``touched`` whether any cell merged, ``loaded_now``/``loaded_before`` the
    recipe hash of the merge in the model now and before the grid (None: a
    real checkpoint), ``kept_before`` whether the pre-grid merge's weights are
    still in the session (they are, unless a cell replaced the result).
    """
    if not touched or action == AFTER_KEEP:
        return STEP_NONE
    if loaded_now == loaded_before:
        return STEP_UNCHANGED
    if loaded_before is None:
        return STEP_RESTORE
    if kept_before:
        return STEP_RELOAD
    return STEP_CANNOT


def after_grid(run: GridRun) -> None:
    """Leave the model the way the setting says once a grid that merged is over."""
    session = dare_merge.get_session()
    action = str(host.setting(OPT_AFTER_GRID, AFTER_RESTORE))
    summary = {"merges": session.merges_performed - run.merges_at_start, "merged": run.touched,
               "seconds": round(time.time() - run.started, 1), "after_grid": action, "restored": None}
    try:
        if not run.touched or action == AFTER_KEEP:
            return
        loader = session.hot_loader
        step = after_grid_step(action, run.touched, loader.loaded_recipe_hash(), run.loaded_hash,
                               run.loaded_result is not None)
        if step == STEP_UNCHANGED:
            summary["restored"] = "unchanged"
        elif step == STEP_RESTORE:
            summary["restored"] = session.restore()
        elif step == STEP_RELOAD:
            result = run.loaded_result
            with session.lock:   # the pre-grid merge is still in RAM: load it back without merging
                loader.load(result.state, result.name, result.recipe_hash, result.recipe)
                session.result = result
                session.hot_loaded = True
            summary["restored"] = result.name
        log(f"after the grid: {summary['restored'] or 'nothing to restore'}")
    except Exception as exc:
        summary["error"] = str(exc)
        log(f"could not restore the model after the grid: {exc}")
    finally:
        _last_grid.clear()
        _last_grid.update(summary)


def last_grid() -> dict:
    """The summary of the last grid that ran (the status route)."""
    return dict(_last_grid)


def wrap_draw(xyz) -> None:
    """Wrap ``xyz_grid.draw_xyz_grid`` (looked up as a module global by ``Script.run``) once."""
    current = xyz.draw_xyz_grid
    if getattr(current, "_dare_merge_original", None) is not None:
        return
    original = current

    def draw_xyz_grid(*args, **kwargs):
        global _grid
        run = None
        try:
            run = GridRun()
        except Exception as exc:  # never keep the plot from running
            log(f"could not note the state before the grid: {exc}")
        _grid = run
        xyz_cache.grid_started()          # the GPU input cache's budget is measured per grid
        try:
            return original(*args, **kwargs)
        finally:
            _grid = None
            try:
                xyz_cache.grid_finished()     # VRAM back to the WebUI before anything is loaded back
            except Exception as exc:
                log(f"could not free the merge input cache after the grid: {exc}")
            if run is not None:
                after_grid(run)

    draw_xyz_grid._dare_merge_original = original
    xyz.draw_xyz_grid = draw_xyz_grid


def unwrap_draw() -> None:
    xyz = xyz_module()
    if xyz is not None:
        original = getattr(xyz.draw_xyz_grid, "_dare_merge_original", None)
        if original is not None:
            xyz.draw_xyz_grid = original


# ----------------------------------------------------------------------------- axes

def xyz_module():
    """The WebUI's loaded ``scripts/xyz_grid.py`` module, or None."""
    from modules import scripts
    for data in scripts.scripts_data:
        if data.script_class.__module__ == "xyz_grid.py" and data.module.__name__ == "xyz_grid.py":
            return data.module
    return None


def _apply(field: str):
    def apply(p, x, xs):
        setattr(p, XYZ_ATTR, with_override(getattr(p, XYZ_ATTR, None), field, x))
    return apply


def _format(spec):
    return lambda p, opt, x: spec.format(x)


def _confirm(spec):
    def confirm(p, xs):
        spec.confirm(xs)                      # ranges, naming the value
        recipe = recipe_for_grid(p)           # raises when there is nothing to merge
        for x in xs:
            try:
                apply_overrides(recipe, {spec.field: x}).validate()
            except Exception as exc:
                raise ValueError(f'{spec.label} value "{x}": {exc}') from None
    return confirm


def register_axes() -> bool:
    """Add the merge axes to the built-in X/Y/Z plot; True when they are there."""
    xyz = xyz_module()
    if xyz is None:
        return False
    wrap_draw(xyz)
    if any(str(getattr(opt, "label", "")).startswith(LABEL_PREFIX) for opt in xyz.axis_options):
        return True
    for spec in AXES:
        choices = spec.choices
        xyz.axis_options.append(xyz.AxisOption(
            spec.label, spec.coerce, _apply(spec.field), format_value=_format(spec), confirm=_confirm(spec),
            cost=spec.cost, choices=(lambda c=choices: list(c)) if choices else None, prepare=spec.parse))
    return True


def on_before_ui() -> None:
    if not register_axes():
        log("the built-in X/Y/Z plot script was not found; merge axes are not available")


# ----------------------------------------------------------------------------- the recipe for a cell

SECTION_ARGS = ("enabled", "use_tab", "base", "models", "method", "p", "k", "alpha", "lam", "vote_sgn", "seed",
                "weights", "split_alpha", "alpha_unet", "alpha_te")
DEFAULTS = {"enabled": False, "use_tab": False, "base": None, "models": [], "method": "dare_ties_soup",
            "p": 0.5, "k": 1.0, "alpha": 0.5, "lam": 1.0, "vote_sgn": True, "seed": 42, "weights": "",
            "split_alpha": False, "alpha_unet": 1.0, "alpha_te": 1.0}


def section_values(args) -> dict:
    """The section's control values by name (``args`` in :data:`SECTION_ARGS` order; None: the default)."""
    values = dict(DEFAULTS)
    values.update({name: value for name, value in zip(SECTION_ARGS, args) if value is not None})
    return values


def section_recipe(values: dict) -> MergeRecipe:
    """The recipe the section's controls describe (checkpoint titles become paths)."""
    from ..errors import MergeError
    from ..ui.form import method_name, parse_seed, parse_weights
    models = values["models"]
    if isinstance(models, str):
        models = split_csv(models)
    if not values["base"]:
        raise MergeError("DARE Merge section: pick a base checkpoint")
    if not models:
        raise MergeError("DARE Merge section: pick at least one model to merge into the base")
    split = bool(values["split_alpha"])
    return MergeRecipe(
        method=method_name(str(values["method"])), base=host.find_checkpoint(str(values["base"])).filename,
        models=[host.find_checkpoint(str(m)).filename for m in models],
        p=float(values["p"]), k=float(values["k"]), alpha=float(values["alpha"]), lam=float(values["lam"]),
        vote_sgn=bool(values["vote_sgn"]), seed=parse_seed(values["seed"]),
        weights=parse_weights(str(values["weights"] or "")),
        alpha_unet=float(values["alpha_unet"]) if split else None,
        alpha_te=float(values["alpha_te"]) if split else None)


def base_recipe(values: dict) -> MergeRecipe:
    """The section's recipe when it is on and not deferring to the tab; else the tab's."""
    from ..errors import MergeError
    if values["enabled"] and not values["use_tab"]:
        return section_recipe(values)
    recipe = tab_recipe()
    if recipe is None:
        raise MergeError("nothing to merge: tick 'DARE Merge' below the prompt and pick a base and models, "
                         "or merge in the DARE Merge tab first (then its recipe is used)")
    return recipe


def section_args_of(p) -> list:
    """The section's control values in ``p.script_args`` (the X/Y/Z script's confirm only has ``p``)."""
    for script in getattr(getattr(p, "scripts", None), "alwayson_scripts", []) or []:
        if getattr(script, "dare_merge_section", False):
            return list(p.script_args[script.args_from:script.args_to])
    return []


def recipe_for_grid(p) -> MergeRecipe:
    return base_recipe(section_values(section_args_of(p)))


def cell_recipe(p, args) -> MergeRecipe | None:
    """The validated recipe one image (or X/Y/Z cell) is made with; None when the section is off and
    no merge axis set a value."""
    overrides = getattr(p, XYZ_ATTR, None)
    values = section_values(args)
    if not values["enabled"] and not overrides:
        return None
    recipe = apply_overrides(base_recipe(values), overrides)
    recipe.validate()
    return recipe


def rebase(recipe: MergeRecipe, base_path: str | None, title: str = "") -> MergeRecipe:
    """``recipe`` with ``base_path`` as its base (validated); itself when that is its base already.

    Why: an image that names a checkpoint (``override_settings``, the X/Y/Z
    "Checkpoint name" axis) while a merge makes it gets that checkpoint as the
    merge's base, so the image is still a merge and its infotext is true.
    """
    if not base_path or os.path.realpath(base_path) == os.path.realpath(recipe.base):
        return recipe
    out = dataclasses.replace(recipe, base=base_path)
    out.validate()
    log(f"this image names the checkpoint {title or os.path.basename(base_path)}: it is the merge's base for it")
    return out


def before_process(p, args) -> None:
    """The section's ``before_process`` (every generation calls it, before the host applies
    ``override_settings``): hot-load the cell's merge and note it in the infotext.  A checkpoint the
    image names becomes the merge's base; without a merge, it replaces a loaded merge cleanly
    (:mod:`.state`)."""
    from . import state
    try:
        recipe = cell_recipe(p, args)
        if recipe is not None:
            named = state.take_checkpoint_override(p)
            if named is not None:
                recipe = rebase(recipe, named.filename, named.title)
            result = load_for_generation(recipe)
            state.pin_loaded_merge()
    except Exception as exc:
        # before_process errors are only logged by the WebUI; generating anyway would label an image
        # with a merge it was not made with, so stop this generation (and the rest of a grid).
        from modules import shared
        log(f"not generating: {exc}")
        shared.state.interrupted = True
        return
    if recipe is None:
        try:
            state.yield_to_override(p)
        except Exception as exc:  # a plain generation must never fail because of the extension
            log(f"could not prepare the checkpoint override: {exc}")
        return
    params = dict(p.extra_generation_params or {})
    params.update(recipe_infotext(result.recipe, result.recipe_hash))
    p.extra_generation_params = params   # a fresh dict: X/Y/Z cells share the original one


def load_for_generation(recipe: MergeRecipe):
    """Hot-load ``recipe``'s merge, merging (from the input cache) only if it is not the loaded one."""
    session = dare_merge.get_session()
    cache = input_cache()
    cache.prepare_recipe(recipe)
    before = session.merges_performed
    with session_reads_from(session, cache):
        result = dare_merge.hot_load_recipe(recipe)
    if session.merges_performed != before:
        _own_hashes.append(result.recipe_hash)
        log(f"merged {result.name} in {result.report.seconds:.1f} s ({cache.stats().summary()})")
    if _grid is not None:
        _grid.touched = True
    return result


# ----------------------------------------------------------------------------- infotext paste

def on_infotext_pasted(infotext: str, params: dict) -> None:
    """Check a pasted merge and turn its file names into this WebUI's checkpoint titles."""
    if not has_recipe(params):
        return
    try:
        fields = recipe_fields_from_infotext(params)
    except ValueError as exc:
        log(f"pasted infotext: {exc}; the merge settings were not restored")
        for key in list(params):
            if key.startswith("DARE "):
                del params[key]
        return
    titles = checkpoint_titles()
    if "base" in fields:
        (base,) = resolve_names([fields["base"]], base_choices(titles))
        if base is None:
            log(f"pasted infotext: base checkpoint {fields['base']!r} is not in the checkpoint list")
        else:
            params[PASTED_BASE] = base
    if "models" in fields:
        found = resolve_pasted_names(fields["models"], titles)   # LoRAs too ("ink" -> "LoRA: ink.safetensors")
        missing = [name for name, title in zip(fields["models"], found) if title is None]
        if missing:
            log(f"pasted infotext: not in the checkpoint list: {', '.join(missing)}")
        params[PASTED_MODELS] = [t for t in found if t is not None]
    for field, value in fields.items():
        if field in AXES_BY_FIELD and field != "method":
            params[INFOTEXT_KEYS[field]] = value
    params[INFOTEXT_KEYS["method"]] = fields["method"]


# ----------------------------------------------------------------------------- settings, route

def on_ui_settings() -> None:
    import gradio as gr
    from modules import shared
    opts = shared.opts
    opts.add_option(OPT_AFTER_GRID, shared.OptionInfo(
        AFTER_RESTORE, "After an X/Y/Z plot that merged", gr.Radio, {"choices": [AFTER_RESTORE, AFTER_KEEP]},
        section=host.SECTION,
    ).info("what the loaded model is once the grid is done"))
    opts.add_option(OPT_CACHE_GPU_MB, shared.OptionInfo(
        -1, "X/Y/Z merge input cache on the GPU (MB)", gr.Number, {"precision": 0, "minimum": -1},
        section=host.SECTION,
    ).info("merge inputs kept in VRAM between the cells of one grid, freed when it ends; -1 = auto: none with "
           "--lowvram/--medvram or on Forge, else the VRAM free when the grid starts minus a reserve for "
           "generation; 0 = none"))


def status() -> dict:
    """GET /dare-merge/v1/xyz: the axes that are registered, the cache, the last grid."""
    xyz = xyz_module()
    labels = [opt.label for opt in xyz.axis_options] if xyz is not None else []
    return {"axes": [spec.label for spec in AXES if spec.label in labels], "cache": cache_stats(),
            "last_grid": last_grid(), "after_grid": str(host.setting(OPT_AFTER_GRID, AFTER_RESTORE)),
            "vram": xyz_cache.vram_status()}


def on_app_started(_demo, app) -> None:
    from .api import api_enabled, auth_dependencies
    if not api_enabled() or any(getattr(r, "path", None) == ROUTE for r in app.routes):
        return
    deps = auth_dependencies()

    def xyz_status():
        return status()

    def xyz_drop_cache():
        return {"message": drop_cache()}

    app.add_api_route(ROUTE, xyz_status, methods=["GET"], dependencies=deps)
    app.add_api_route(f"{ROUTE}/drop-cache", xyz_drop_cache, methods=["POST"], dependencies=deps)


def on_script_unloaded() -> None:
    unwrap_draw()
    drop_cache()


__all__ = ["XYZ_ATTR", "OPT_AFTER_GRID", "AFTER_RESTORE", "AFTER_KEEP", "ROUTE", "GridRun", "after_grid_step",
           "after_grid", "register_axes", "on_before_ui", "section_values", "section_recipe", "base_recipe",
           "recipe_for_grid", "cell_recipe", "before_process", "load_for_generation", "on_infotext_pasted",
           "on_ui_settings", "on_app_started", "on_script_unloaded", "status", "tab_recipe"]
