"""sd-webui-dare-merge: merge knobs on the built-in X/Y/Z plot, and the "DARE Merge" section of txt2img/img2img.

Three things, all WebUI glue over pure code in ``lib_merge``:

- **Axes.**  ``lib_merge.xyz_axes.AXES`` become ``xyz_grid.AxisOption`` s.
  They are added when this file is executed *and* from ``on_before_ui``:
  with ``--nowebui`` the API builds the scripts' controls (which index the
  axis list) before ``on_before_ui`` runs, and ``xyz_grid.py`` is loaded
  before any extension, so the import-time add is the one that counts there;
  the callback covers a WebUI that loads scripts in another order.  A label
  check keeps them from being added twice (also across "Reload UI").  An
  axis only records its value on the cell's ``p`` (``p.dare_merge_xyz``).
- **The section.**  An always-visible script, collapsed and off unless
  ticked.  ``before_process`` (run for every image, and for every X/Y/Z
  cell, before the WebUI loads weights) builds the effective recipe — the
  section's controls or the tab's current recipe, with the cell's axis
  values put in — and hot-loads it through ``lib_merge.webui.hot_load_recipe``,
  which merges only when the recipe hash differs from the loaded merge.  The
  inputs are read through ``lib_merge.input_cache.InputCache``, so a cell
  after the first costs kernel time.  The recipe goes into the image's
  infotext; pasting it back sets the section's controls again.  Disabled and
  with no axis, it does nothing at all.
- **After the grid.**  ``xyz_grid.draw_xyz_grid`` is wrapped so that, once a
  grid that merged is done, the model is what Settings > DARE Merge asks for:
  the last merge kept, or what was loaded before the grid put back.
"""
from __future__ import annotations

import collections
import threading
import time

import gradio as gr

from modules import script_callbacks, scripts, shared

import lib_merge.webui as dare_merge
from lib_merge.input_cache import MB, InputCache, session_reads_from
from lib_merge.methods import METHODS
from lib_merge.recipe import MergeRecipe
from lib_merge.webui import host
from lib_merge.xyz_axes import (AXES, AXES_BY_FIELD, INFOTEXT_BASE, INFOTEXT_KEYS, INFOTEXT_MODELS,
                                LABEL_PREFIX, apply_overrides, has_recipe, recipe_fields_from_infotext,
                                recipe_infotext, resolve_names, split_csv, with_override)

XYZ_ATTR = "dare_merge_xyz"
OPT_AFTER_GRID = "dare_merge_xyz_after_grid"
OPT_CACHE_GPU_MB = "dare_merge_cache_gpu_mb"
AFTER_RESTORE = "restore what was loaded before the grid"
AFTER_KEEP = "keep the last merge"
ROUTE = "/dare-merge/v1/xyz"
_PASTED_BASE = "DARE base title"      # filled by on_infotext_pasted for the section's dropdowns
_PASTED_MODELS = "DARE model titles"


def log(message: str) -> None:
    print(f"[DARE Merge] {message}", flush=True)


# ----------------------------------------------------------------------------- the input cache

_cache_lock = threading.Lock()
_cache: InputCache | None = None
_auto_gpu_mb: float | None = None


def gpu_budget_mb(device: str) -> float:
    """The device budget: the setting, where -1 means half the GPU memory free at first use."""
    global _auto_gpu_mb
    if not str(device).startswith("cuda"):
        return 0
    try:
        value = float(host.setting(OPT_CACHE_GPU_MB, -1))
    except (TypeError, ValueError):
        value = -1
    if value >= 0:
        return value
    if _auto_gpu_mb is None:
        import torch
        free, _total = torch.cuda.mem_get_info()
        _auto_gpu_mb = free / 2 / MB
    return _auto_gpu_mb


def input_cache() -> InputCache:
    """The process-wide cache, configured from the current settings (changing them drops it)."""
    global _cache
    device = host.merge_device()
    with _cache_lock:
        if _cache is None:
            _cache = InputCache(device)
        _cache.configure(device, gpu_budget_mb(device), host.cache_budget_mb())
        return _cache


def drop_cache() -> str:
    with _cache_lock:
        if _cache is not None:
            _cache.drop()
    return "input cache dropped"


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
    """The recipe last merged by the tab or the HTTP route (not by this script's cells)."""
    global _tab_recipe
    if _grid is not None:
        return _grid.tab_recipe
    result = dare_merge.get_session().result
    if result is not None and result.recipe_hash not in _own_hashes:
        _tab_recipe = result.recipe
    return _tab_recipe


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
        if loader.loaded_recipe_hash() == run.loaded_hash:
            summary["restored"] = "unchanged"
        elif run.loaded_hash is None:
            summary["restored"] = session.restore()
        elif run.loaded_result is not None:
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
        try:
            return original(*args, **kwargs)
        finally:
            _grid = None
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


# ----------------------------------------------------------------------------- the section's recipe

SECTION_ARGS = ("enabled", "use_tab", "base", "models", "method", "p", "k", "alpha", "lam", "vote_sgn", "seed",
                "weights", "split_alpha", "alpha_unet", "alpha_te")
DEFAULTS = {"enabled": False, "use_tab": False, "base": None, "models": [], "method": "dare_ties_soup",
            "p": 0.5, "k": 1.0, "alpha": 0.5, "lam": 1.0, "vote_sgn": True, "seed": 42, "weights": "",
            "split_alpha": False, "alpha_unet": 1.0, "alpha_te": 1.0}


def section_values(args) -> dict:
    values = dict(DEFAULTS)
    values.update({name: value for name, value in zip(SECTION_ARGS, args) if value is not None})
    return values


def section_recipe(values: dict) -> MergeRecipe:
    """The recipe the section's controls describe (checkpoint titles become paths)."""
    from lib_merge.errors import MergeError
    from lib_merge.ui.form import method_name, parse_seed, parse_weights
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
    from lib_merge.errors import MergeError
    if values["enabled"] and not values["use_tab"]:
        return section_recipe(values)
    recipe = tab_recipe()
    if recipe is None:
        raise MergeError("nothing to merge: tick 'DARE Merge' below the prompt and pick a base and models, "
                         "or merge in the DARE Merge tab first (then its recipe is used)")
    return recipe


def section_args_of(p) -> list:
    for script in getattr(getattr(p, "scripts", None), "alwayson_scripts", []) or []:
        if getattr(script, "dare_merge_section", False):
            return list(p.script_args[script.args_from:script.args_to])
    return []


def recipe_for_grid(p) -> MergeRecipe:
    return base_recipe(section_values(section_args_of(p)))


# ----------------------------------------------------------------------------- the section

def _checkpoint_titles() -> list[str]:
    try:
        return host.checkpoint_titles()
    except Exception:
        return []


class DareMergeSection(scripts.Script):
    """The "DARE Merge" section under txt2img/img2img (see the module doc)."""

    dare_merge_section = True

    def title(self):
        return "DARE Merge"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        from modules.ui_components import InputAccordion, ToolButton
        tab = "img2img" if is_img2img else "txt2img"

        def eid(name: str) -> str:
            return f"dare_merge_xyz_{tab}_{name}"

        titles = _checkpoint_titles()
        d = DEFAULTS
        with InputAccordion(False, label="DARE Merge", elem_id=eid("enabled")) as enabled:
            use_tab = gr.Checkbox(value=False, label="Use the DARE Merge tab's current recipe", elem_id=eid("use_tab"))
            with gr.Row():
                base = gr.Dropdown(choices=titles, value=None, label="Base checkpoint", elem_id=eid("base"))
                models = gr.Dropdown(choices=titles, value=[], multiselect=True, label="Models to merge",
                                     elem_id=eid("models"))
                refresh = ToolButton(value="\U0001f504", elem_id=eid("refresh"))
            with gr.Row():
                method = gr.Dropdown(choices=list(METHODS), value=d["method"], label="Method", elem_id=eid("method"))
                weights = gr.Textbox(value="", label="Per-model weights", placeholder="empty: all 1",
                                     elem_id=eid("weights"))
                seed = gr.Number(value=d["seed"], precision=0, label="Merge seed", elem_id=eid("seed"))
            with gr.Row():
                p = gr.Slider(0.0, 0.99, value=d["p"], step=0.01, label="p (DARE drop rate)", elem_id=eid("p"))
                k = gr.Slider(0.01, 1.0, value=d["k"], step=0.01, label="k (TIES keep fraction)", elem_id=eid("k"))
                alpha = gr.Slider(-1.0, 2.0, value=d["alpha"], step=0.01, label="alpha", elem_id=eid("alpha"))
                lam = gr.Slider(0.0, 2.0, value=d["lam"], step=0.01, label="λ (DARE rescale)", elem_id=eid("lambda"))
            with gr.Row():
                vote_sgn = gr.Checkbox(value=d["vote_sgn"], label="vote_sgn (count signs)", elem_id=eid("vote_sgn"))
                split_alpha = gr.Checkbox(value=False, label="Per-component alpha", elem_id=eid("split_alpha"))
                alpha_unet = gr.Slider(-1.0, 2.0, value=1.0, step=0.01, label="alpha UNet", elem_id=eid("alpha_unet"))
                alpha_te = gr.Slider(-1.0, 2.0, value=1.0, step=0.01, label="alpha TE", elem_id=eid("alpha_te"))
            with gr.Row():
                drop = gr.Button("Drop the merge input cache", elem_id=eid("drop_cache"))
                cache_status = gr.Textbox(value="", label="Input cache", interactive=False, lines=1,
                                          elem_id=eid("cache_status"))

        def refresh_lists(base_v, models_v):
            host.refresh_checkpoints()
            choices = _checkpoint_titles()
            return (gr.update(choices=choices, value=base_v if base_v in choices else None),
                    gr.update(choices=choices, value=[m for m in (models_v or []) if m in choices]))

        refresh.click(refresh_lists, inputs=[base, models], outputs=[base, models])
        drop.click(lambda: drop_cache(), inputs=None, outputs=[cache_status])

        def pasted(key, convert=lambda v: v):
            return lambda params: convert(params[key]) if key in params else None

        self.infotext_fields = [
            (enabled, lambda params: has_recipe(params)),
            (use_tab, lambda params: False if has_recipe(params) else None),
            (base, pasted(_PASTED_BASE)),
            (models, pasted(_PASTED_MODELS)),
            (method, pasted(INFOTEXT_KEYS["method"])),
            (p, pasted(INFOTEXT_KEYS["p"])), (k, pasted(INFOTEXT_KEYS["k"])),
            (alpha, pasted(INFOTEXT_KEYS["alpha"])), (lam, pasted(INFOTEXT_KEYS["lam"])),
            (vote_sgn, pasted(INFOTEXT_KEYS["vote_sgn"])), (seed, pasted(INFOTEXT_KEYS["seed"])),
            (weights, lambda params: params.get(INFOTEXT_KEYS["weights"], "") if has_recipe(params) else None),
            (split_alpha, lambda params: (INFOTEXT_KEYS["alpha_unet"] in params or INFOTEXT_KEYS["alpha_te"] in params)
             if has_recipe(params) else None),
            (alpha_unet, pasted(INFOTEXT_KEYS["alpha_unet"])), (alpha_te, pasted(INFOTEXT_KEYS["alpha_te"])),
        ]
        self.paste_field_names = [INFOTEXT_KEYS[f] for f in INFOTEXT_KEYS] + [INFOTEXT_BASE, INFOTEXT_MODELS]
        return [enabled, use_tab, base, models, method, p, k, alpha, lam, vote_sgn, seed, weights, split_alpha,
                alpha_unet, alpha_te]

    def before_process(self, p, *args):
        overrides = getattr(p, XYZ_ATTR, None)
        values = section_values(args)
        if not values["enabled"] and not overrides:
            return
        try:
            recipe = apply_overrides(base_recipe(values), overrides)
            recipe.validate()
            result = load_for_generation(recipe)
        except Exception as exc:
            # before_process errors are only logged by the WebUI; generating anyway would label an image
            # with a merge it was not made with, so stop this generation (and the rest of a grid).
            log(f"not generating: {exc}")
            shared.state.interrupted = True
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
    titles = _checkpoint_titles()
    if "base" in fields:
        (base,) = resolve_names([fields["base"]], titles)
        if base is None:
            log(f"pasted infotext: base checkpoint {fields['base']!r} is not in the checkpoint list")
        else:
            params[_PASTED_BASE] = base
    if "models" in fields:
        found = resolve_names(fields["models"], titles)
        missing = [name for name, title in zip(fields["models"], found) if title is None]
        if missing:
            log(f"pasted infotext: not in the checkpoint list: {', '.join(missing)}")
        params[_PASTED_MODELS] = [t for t in found if t is not None]
    for field, value in fields.items():
        if field in AXES_BY_FIELD and field != "method":
            params[INFOTEXT_KEYS[field]] = value
    params[INFOTEXT_KEYS["method"]] = fields["method"]


# ----------------------------------------------------------------------------- settings, route

def on_ui_settings() -> None:
    opts = shared.opts
    opts.add_option(OPT_AFTER_GRID, shared.OptionInfo(
        AFTER_RESTORE, "After an X/Y/Z plot that merged", gr.Radio, {"choices": [AFTER_RESTORE, AFTER_KEEP]},
        section=host.SECTION,
    ).info("what the loaded model is once the grid is done"))
    opts.add_option(OPT_CACHE_GPU_MB, shared.OptionInfo(
        -1, "Merge input cache on the GPU (MB)", gr.Number, {"precision": 0, "minimum": -1}, section=host.SECTION,
    ).info("X/Y/Z merge inputs kept in VRAM between cells; -1 = half the free VRAM, 0 = none "
           "(the RAM budget is the cache budget above)"))


def on_app_started(_demo, app) -> None:
    from lib_merge.webui.api import api_enabled, auth_dependencies
    if not api_enabled() or any(getattr(r, "path", None) == ROUTE for r in app.routes):
        return
    deps = auth_dependencies()

    def xyz_status():
        xyz = xyz_module()
        labels = [opt.label for opt in xyz.axis_options] if xyz is not None else []
        with _cache_lock:
            cache = _cache.stats().as_dict() if _cache is not None else None
        return {"axes": [spec.label for spec in AXES if spec.label in labels], "cache": cache,
                "last_grid": dict(_last_grid),
                "after_grid": str(host.setting(OPT_AFTER_GRID, AFTER_RESTORE))}

    def xyz_drop_cache():
        return {"message": drop_cache()}

    app.add_api_route(ROUTE, xyz_status, methods=["GET"], dependencies=deps)
    app.add_api_route(f"{ROUTE}/drop-cache", xyz_drop_cache, methods=["POST"], dependencies=deps)


def on_script_unloaded() -> None:
    unwrap_draw()
    drop_cache()


register_axes()
script_callbacks.on_before_ui(on_before_ui)
script_callbacks.on_infotext_pasted(on_infotext_pasted)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
script_callbacks.on_script_unloaded(on_script_unloaded)
