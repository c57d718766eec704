"""The "DARE Merge" tab: the same gradio Blocks in the standalone server and in a WebUI.

Everything host-specific (where checkpoints are, hot-loading, the queue lock,
a progress bar) comes through a :class:`~lib_merge.ui.host.TabHost`; gradio
version differences go through :mod:`lib_merge.ui.compat`.  Every control has
an ``elem_id`` starting with ``dare_merge_``: the hover titles and the browser
tests find controls by it.
"""
from __future__ import annotations

import os
import random
import threading
from typing import Any, Callable, Iterator

from . import compat
from .compat import gr
from .form import (DEFAULT_METHOD, FORM_FIELDS, MERGE_MODES, PRESET_ORDER, PRESET_TITLES, RESCALE_MODES,
                   SLIDER_RANGES, FormValues, clamp_knob, extra_preset_values, knob_is_live, method_name,
                   preset_values)
from .host import TabHost
from .analysis_panel import build_analysis
from .selftest_panel import build_selftest
from .texts import error_text, inspect_text, merged_text, progress_text
from ..arch import BLOCK_PRESETS, block_preset
from ..checkpoint import open_checkpoint
from ..errors import MergeError, OutputError
from ..lora.listing import base_choices   # a LoRA is never a base: left out of the base list
from ..methods import METHODS
from ..recipe import OUTPUT_DTYPES, MergeRecipe
from ..names import check_save_name

POLL_SECONDS = 0.4
# Symbols every common font has (emoji need an emoji font, which headless/server machines often lack).
REFRESH = "\u21bb"   # ↻
DICE = "\u2684"      # ⚄
BLOCK_PRESET_OFF = "off (no block weights)"


def _stream(host: TabHost, work: Callable[[Callable], Any], what: str) -> Iterator[tuple[str, Any, BaseException | None]]:
    """Run ``work(progress)`` on a thread; yield (progress text, result, error) while it runs and once at the end.

    The merge itself must not run on the event's own thread: the page would
    see nothing until it finished, and Cancel could not reach it.
    """
    state: dict[str, Any] = {"ev": None}

    def progress(ev) -> None:
        state["ev"] = ev
        try:
            host.on_progress(ev)
        except Exception:  # a host's progress bar must never break a merge
            pass

    def runner() -> None:
        try:
            state["result"] = work(progress)
        except BaseException as exc:  # reported in the status area
            state["error"] = exc

    thread = threading.Thread(target=runner, name="dare-merge", daemon=True)
    thread.start()
    last = None
    while thread.is_alive():
        text = progress_text(state["ev"], what)
        if text != last:
            last = text
            yield text, None, None
        thread.join(POLL_SECONDS)
    yield "", state.get("result"), state.get("error")


def _check_device(device: str) -> str:
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise MergeError("CUDA is not available here; choose the cpu device")
    return device


def checked_recipe(form_values, device: str, resolve) -> MergeRecipe:
    """The form's recipe, validated, on a usable device: what Merge, Save and Save as LoRA all check
    before they start (one line on the page for any mistake)."""
    recipe = FormValues(*form_values).recipe(resolve)
    _check_device(device)
    recipe.validate()
    return recipe


def _device_choices(default: str) -> list[str]:
    """cpu and cuda, plus whatever the host defaults to (a WebUI may say "cuda:1" or "mps")."""
    choices = ["cpu", "cuda"]
    return choices if default in choices else [*choices, default]


def _arch_of(host: TabHost, title: str | None) -> str:
    """Architecture of the chosen base (for block presets); SD1 when unknown."""
    if title:
        try:
            with open_checkpoint(host.resolve(title)) as ckpt:
                arch = ckpt.arch
            if arch:
                return arch
        except MergeError:
            pass
    return "sd1"



def clamp_typed_values(controls) -> None:
    """Answer a value typed past a slider's end with the end value at once, so the box shows what the merge
    uses (the page clamps it too, but only when the box loses focus). ``controls``: (knob, slider) pairs;
    the tab and the WebUI's X/Y/Z section both wire their sliders through this."""
    def clamp_to(knob):
        def clamp(value):
            clamped = clamp_knob(knob, value)
            return compat.update() if clamped is None else compat.update(value=clamped)
        return clamp

    for knob, control in controls:
        control.input(clamp_to(knob), inputs=[control], outputs=[control], queue=False)

def build_tab(host: TabHost) -> gr.Blocks:
    """Build the tab's Blocks (render it inside a WebUI's tabs, or serve it as is)."""
    titles = host.list_checkpoints()
    default = preset_values(DEFAULT_METHOD)
    slider = dict(step=0.01, interactive=True)

    with compat.blocks() as tab:
        with gr.Row(elem_id="dare_merge_layout"):
            with gr.Column(scale=3, elem_id="dare_merge_left"):
                with gr.Row(elem_id="dare_merge_base_row"):
                    base = gr.Dropdown(choices=base_choices(titles), value=None, label="Base checkpoint",
                                       elem_id="dare_merge_base", scale=8)
                    base_refresh = gr.Button(REFRESH, elem_id="dare_merge_base_refresh", scale=0, min_width=48,
                                             elem_classes=["dare_merge_tool"])
                with gr.Row(elem_id="dare_merge_models_row"):
                    models = gr.Dropdown(choices=titles, value=[], multiselect=True, label="Models to merge",
                                         elem_id="dare_merge_models", scale=8)
                    models_refresh = gr.Button(REFRESH, elem_id="dare_merge_models_refresh", scale=0, min_width=48,
                                               elem_classes=["dare_merge_tool"])
                weights = gr.Textbox(label="Per-model weights (optional)", placeholder="e.g. 1, 0.5 — empty: all 1",
                                     elem_id="dare_merge_weights", lines=1)
                with gr.Row():
                    method = gr.Dropdown(choices=[PRESET_TITLES[n] for n in PRESET_ORDER],
                                         value=PRESET_TITLES[DEFAULT_METHOD], label="Method preset",
                                         elem_id="dare_merge_method", scale=1)
                    method_help = gr.Markdown(METHODS[DEFAULT_METHOD].help, elem_id="dare_merge_method_help")
                with gr.Row():
                    p = gr.Slider(*SLIDER_RANGES["p"], value=default["p"], label="p (DARE drop rate)",
                                  elem_id="dare_merge_p", **slider)
                    k = gr.Slider(*SLIDER_RANGES["k"], value=default["k"], label="k (TIES keep fraction)",
                                  elem_id="dare_merge_k", **slider)
                with gr.Row():
                    alpha = gr.Slider(*SLIDER_RANGES["alpha"], value=default["alpha"], label="alpha (strength)",
                                      elem_id="dare_merge_alpha", **slider)
                    lam = gr.Slider(*SLIDER_RANGES["lam"], value=default["lam"], label="λ (DARE rescale)",
                                    elem_id="dare_merge_lambda", **slider)
                extra = extra_preset_values(DEFAULT_METHOD)
                with gr.Row(equal_height=True):
                    epsilon = gr.Slider(*SLIDER_RANGES["epsilon"], value=extra["epsilon"],
                                        label="ε (DELLA keep-probability spread)", elem_id="dare_merge_epsilon",
                                        step=0.01, interactive=knob_is_live(DEFAULT_METHOD, "epsilon"))
                    beta = gr.Slider(*SLIDER_RANGES["beta"], value=extra["beta"],
                                     label="β (Breadcrumbs: largest fraction dropped)", elem_id="dare_merge_beta",
                                     step=0.01, interactive=knob_is_live(DEFAULT_METHOD, "beta"))
                    rescale = gr.Radio(list(RESCALE_MODES), value=extra["rescale"], label="Rescale",
                                       elem_id="dare_merge_rescale",
                                       interactive=knob_is_live(DEFAULT_METHOD, "rescale"))
                with gr.Row(equal_height=True):
                    vote_sgn = gr.Checkbox(value=bool(default["vote_sgn"]), label="vote_sgn (count signs)",
                                           elem_id="dare_merge_vote_sgn",
                                           interactive=knob_is_live(DEFAULT_METHOD, "vote_sgn"))
                    seed = gr.Number(value=42, precision=0, label="Seed", elem_id="dare_merge_seed", scale=3)
                    seed_random = gr.Button(DICE, elem_id="dare_merge_seed_random", scale=0, min_width=48,
                                            elem_classes=["dare_merge_tool"])
                with gr.Accordion("Advanced", open=False, elem_id="dare_merge_advanced"):
                    with gr.Row():
                        split_alpha = gr.Checkbox(value=False, label="Per-component alpha",
                                                  elem_id="dare_merge_split_alpha")
                        alpha_unet = gr.Slider(*SLIDER_RANGES["alpha_unet"], value=1.0, label="alpha UNet", step=0.01,
                                               interactive=False, elem_id="dare_merge_alpha_unet")
                        alpha_te = gr.Slider(*SLIDER_RANGES["alpha_te"], value=1.0, label="alpha text encoder",
                                             step=0.01,
                                             interactive=False, elem_id="dare_merge_alpha_te")
                    with gr.Row():
                        block_preset_dd = gr.Dropdown(choices=[BLOCK_PRESET_OFF, *BLOCK_PRESETS], value=None,
                                                      label="Block weight preset", elem_id="dare_merge_block_preset",
                                                      scale=2)
                        block_weights = gr.Textbox(label="Block weights (alpha multiplier per block)",
                                                   placeholder="26 values (SD1/SD2) or 20 (SDXL); empty = off",
                                                   elem_id="dare_merge_block_weights", scale=3)
                    with gr.Row():
                        block_p = gr.Textbox(label="p per block (optional)", placeholder="same notation; empty = p",
                                             elem_id="dare_merge_block_p")
                        block_k = gr.Textbox(label="k per block (optional)", placeholder="same notation; empty = k",
                                             elem_id="dare_merge_block_k")
                    with gr.Row():
                        merge_mode = gr.Radio(list(MERGE_MODES), value=MERGE_MODES[0], label="Combine deltas by",
                                              elem_id="dare_merge_merge_mode")
                        vae = gr.Radio(["base", "merge"], value="base", label="VAE", elem_id="dare_merge_vae")
                        skip_mismatched = gr.Checkbox(value=False, label="Skip keys whose shapes differ",
                                                      elem_id="dare_merge_skip_mismatched")
                    with gr.Row():
                        device = gr.Dropdown(choices=_device_choices(host.default_device()),
                                             value=host.default_device(),
                                             label="Device", elem_id="dare_merge_device")
                        precision = gr.Radio(list(OUTPUT_DTYPES), value=host.default_precision(),
                                             label="Working precision", elem_id="dare_merge_precision")
                    build_selftest(host, device)

            with gr.Column(scale=2, elem_id="dare_merge_right"):
                with gr.Row():
                    run = gr.Button("Merge", variant="primary", elem_id="dare_merge_run")
                    cancel = gr.Button("Cancel", elem_id="dare_merge_cancel")
                    restore = gr.Button("Restore original", elem_id="dare_merge_restore",
                                        visible=host.can_hot_load)
                hot_load = gr.Checkbox(value=host.can_hot_load, label="Hot-load into the running model",
                                       elem_id="dare_merge_hot_load", visible=host.can_hot_load)
                status = gr.Textbox(value="idle", label="Status", lines=6, max_lines=24, interactive=False,
                                    elem_id="dare_merge_status")
                with gr.Group(elem_id="dare_merge_save_group"):
                    save_name = gr.Textbox(label="Save as", placeholder="file name (.safetensors added)",
                                           elem_id="dare_merge_save_name")
                    with gr.Row(equal_height=True):
                        save_dtype = gr.Dropdown(choices=list(OUTPUT_DTYPES), value="fp16", label="Saved precision",
                                                 elem_id="dare_merge_save_dtype")
                        save_overwrite = gr.Checkbox(value=False, label="Overwrite", elem_id="dare_merge_save_overwrite")
                    save = gr.Button("Save", elem_id="dare_merge_save")
                    with gr.Row(equal_height=True):
                        lora_rank = gr.Number(value=32, precision=0, label="LoRA rank",
                                              elem_id="dare_merge_lora_rank")
                        save_lora = gr.Button("Save as LoRA", elem_id="dare_merge_save_lora")
                with gr.Accordion("Inspect a checkpoint", open=False, visible=host.show_inspect,
                                  elem_id="dare_merge_inspect"):
                    with gr.Row():
                        inspect_file = gr.Dropdown(choices=titles, value=None, label="Checkpoint",
                                                   elem_id="dare_merge_inspect_file", scale=8)
                        inspect_refresh = gr.Button(REFRESH, elem_id="dare_merge_inspect_refresh", scale=0,
                                                    min_width=48, elem_classes=["dare_merge_tool"])
                    inspect_button = gr.Button("Inspect", elem_id="dare_merge_inspect_button")
                    inspect_output = gr.Textbox(label="Summary", lines=8, max_lines=30, interactive=False,
                                                elem_id="dare_merge_inspect_output")

        form = dict(base=base, models=models, weights=weights, method=method, p=p, k=k, alpha=alpha, lam=lam,
                    vote_sgn=vote_sgn, seed=seed, split_alpha=split_alpha, alpha_unet=alpha_unet,
                    alpha_te=alpha_te, block_weights=block_weights, block_p=block_p, block_k=block_k,
                    merge_mode=merge_mode, vae=vae,
                    skip_mismatched=skip_mismatched, epsilon=epsilon, beta=beta, rescale=rescale)
        form_inputs = [form[name] for name in FORM_FIELDS]
        lists = [base, models, inspect_file]
        analysis = build_analysis(host, form_inputs, device, checked_recipe)   # full width, below the form

        # -- checkpoint lists
        def refresh_lists(base_v, models_v, inspect_v):
            host.refresh()
            choices = host.list_checkpoints()
            return (compat.dropdown_update(base_choices(choices), base_v), compat.dropdown_update(choices, models_v, True),
                    compat.dropdown_update(choices, inspect_v))

        for button in (base_refresh, models_refresh, inspect_refresh):
            button.click(refresh_lists, inputs=lists, outputs=lists, queue=False)

        # -- presets
        def apply_preset(title):
            name = method_name(title)
            values = preset_values(name)
            values.update(extra_preset_values(name))
            knobs = [(p, "p"), (k, "k"), (alpha, "alpha"), (lam, "lam"), (vote_sgn, "vote_sgn"),
                     (epsilon, "epsilon"), (beta, "beta"), (rescale, "rescale")]
            return [compat.update(value=values[knob], interactive=knob_is_live(name, knob)) for _, knob in knobs] \
                + [compat.update(value=METHODS[name].help)]

        method.change(apply_preset, inputs=[method],
                      outputs=[p, k, alpha, lam, vote_sgn, epsilon, beta, rescale, method_help], queue=False)

        clamp_typed_values((("p", p), ("k", k), ("alpha", alpha), ("lam", lam), ("alpha_unet", alpha_unet),
                            ("alpha_te", alpha_te), ("epsilon", epsilon), ("beta", beta)))

        split_alpha.change(lambda on: (compat.update(interactive=bool(on)), compat.update(interactive=bool(on))),
                           inputs=[split_alpha], outputs=[alpha_unet, alpha_te], queue=False)

        seed_random.click(lambda: random.randrange(0, 2 ** 32), inputs=None, outputs=[seed], queue=False)

        def apply_block_preset(name, base_v, current):
            if not name:
                return compat.update(value=current)
            if name == BLOCK_PRESET_OFF:
                return compat.update(value="")
            return compat.update(value=block_preset(name, _arch_of(host, base_v)))

        block_preset_dd.change(apply_block_preset, inputs=[block_preset_dd, base, block_weights],
                               outputs=[block_weights], queue=False)

        # -- merge
        def merge_and_report(recipe, device_v, precision_v, hot_load_v, what="merging"):
            """Generator of status texts; returns the MergeResult (or None) via StopIteration."""
            session = host.session
            do_hot_load = bool(hot_load_v) and host.can_hot_load

            def work(progress):
                return host.run_exclusive(lambda: session.merge(
                    recipe, dtype=precision_v, device=device_v, hot_load=do_hot_load, progress=progress,
                    stats=True))   # the Analysis panel shows them after the merge

            for text, result, error in _stream(host, work, what):
                if error is not None:
                    yield error_text(error)
                    return None
                if result is not None:
                    return result
                yield text
            return None

        def on_merge(*values):
            *form_v, device_v, precision_v, hot_load_v, name_v = values
            try:
                recipe = checked_recipe(form_v, device_v, host.resolve)
            except Exception as exc:
                yield error_text(exc), compat.update()
                return
            result = yield from _relay(merge_and_report(recipe, device_v, precision_v, hot_load_v),
                                       (compat.update(),))
            if result is not None:
                hot = bool(hot_load_v) and host.can_hot_load
                name_update = compat.update(value=result.name) if not (name_v or "").strip() else compat.update()
                yield merged_text(result, hot), name_update

        run.click(on_merge, inputs=[*form_inputs, device, precision, hot_load, save_name],
                  outputs=[status, save_name]).then(analysis.after_merge, inputs=None, outputs=analysis.outputs)

        def on_cancel():
            return "cancelling… the merge stops within one key" if host.session.cancel() else "nothing is running"

        cancel.click(on_cancel, inputs=None, outputs=[status], queue=False)

        def on_restore():
            try:
                return f"restored {host.run_exclusive(host.session.restore)}"
            except Exception as exc:
                return error_text(exc)

        restore.click(on_restore, inputs=None, outputs=[status])

        # -- save
        def on_save(*values):
            *form_v, device_v, precision_v, name_v, dtype_v, overwrite_v, base_v, models_v, inspect_v = values
            keep = (compat.update(), compat.update(), compat.update())
            session = host.session
            try:
                filename = check_save_name(name_v or "", session.models_dir)
                target = os.path.join(session.models_dir, filename)
                if os.path.exists(target) and not overwrite_v:
                    raise OutputError("exists already; tick 'Overwrite' or choose another name", target)
                recipe = checked_recipe(form_v, device_v, host.resolve)
            except Exception as exc:
                yield (error_text(exc), *keep)
                return
            current = session.result
            how = "written from the merge in memory"
            if current is None or current.recipe != recipe.resolved():
                how = "merged first: nothing in memory matched these settings"
                result = yield from _relay(
                    merge_and_report(recipe, device_v, precision_v, False, "merging before saving"), keep)
                if result is None:
                    return
            try:
                path = host.run_exclusive(lambda: session.save(filename, dtype_v, bool(overwrite_v), recipe))
                host.refresh()
            except Exception as exc:
                yield (error_text(exc), *keep)
                return
            choices = host.list_checkpoints()
            size = os.path.getsize(path) / 1e9
            yield (f"saved {path} ({dtype_v}, {size:.2f} GB; {how})\n{session.result.report.summary()}",
                   compat.dropdown_update(base_choices(choices), base_v), compat.dropdown_update(choices, models_v, True),
                   compat.dropdown_update(choices, inspect_v))

        save.click(on_save,
                   inputs=[*form_inputs, device, precision, save_name, save_dtype, save_overwrite, *lists],
                   outputs=[status, *lists])

        # -- save as LoRA (issue 11): the merged delta by truncated SVD, into the host's Lora folder
        def on_save_lora(*values):
            *form_v, device_v, name_v, rank_v, overwrite_v, base_v, models_v, inspect_v = values
            keep = (compat.update(), compat.update(), compat.update())
            session = host.session
            try:
                folder = host.lora_folder()
                filename = check_save_name(name_v or "", folder)
                target = os.path.join(folder, filename)
                if os.path.exists(target) and not overwrite_v:
                    raise OutputError("exists already; tick 'Overwrite' or choose another name", target)
                rank = int(rank_v or 0)
                if rank < 1:
                    raise MergeError(f"LoRA rank must be at least 1, got {rank_v}")
                recipe = checked_recipe(form_v, device_v, host.resolve)
            except Exception as exc:
                yield (error_text(exc), *keep)
                return
            yield ("writing the merge as a LoRA (merging in float32, then one SVD per layer)...", *keep)
            from ..lora.extract import merge_to_lora
            try:
                _, extract = host.run_exclusive(lambda: merge_to_lora(
                    recipe, target, rank, device=device_v, overwrite=bool(overwrite_v), lora_dtype="fp16",
                    protected_paths=session.protected_files()))
                host.refresh()
            except Exception as exc:
                yield (error_text(exc), *keep)
                return
            choices = host.list_checkpoints()
            yield ("\n".join(extract.lines()), compat.dropdown_update(base_choices(choices), base_v),
                   compat.dropdown_update(choices, models_v, True), compat.dropdown_update(choices, inspect_v))

        save_lora.click(on_save_lora,
                        inputs=[*form_inputs, device, save_name, lora_rank, save_overwrite, *lists],
                        outputs=[status, *lists])

        # -- inspect
        def on_inspect(title):
            if not title:
                return "pick a checkpoint to inspect"
            try:
                return inspect_text(host.resolve(title))
            except Exception as exc:
                return error_text(exc)

        inspect_button.click(on_inspect, inputs=[inspect_file], outputs=[inspect_output])

    return tab


def _relay(gen: Iterator[str], pad: tuple) -> Iterator[tuple]:
    """Forward a status generator's texts as (status, *pad) rows for multi-output events; return its value."""
    while True:
        try:
            text = next(gen)
        except StopIteration as stop:
            return stop.value
        yield (text, *pad)
