"""The controls of the "DARE Merge" section under txt2img/img2img (gradio, built inside the WebUI).

``scripts/dare_merge_xyz.py``'s ``Script.ui`` calls :func:`build_section`;
what the controls mean (the recipe, the hot-load) is in :mod:`.xyz`.  The
order of the returned components is :data:`.xyz.SECTION_ARGS`: it is the
order ``before_process`` receives their values in.
"""
from __future__ import annotations

from ..lora.listing import base_choices
from ..methods import METHODS
from ..ui.form import SLIDER_RANGES
from ..xyz_axes import INFOTEXT_BASE, INFOTEXT_KEYS, INFOTEXT_MODELS, has_recipe
from . import host
from .xyz import DEFAULTS, PASTED_BASE, PASTED_MODELS, checkpoint_titles
from .xyz_cache import drop_cache


def build_section(script, is_img2img: bool) -> list:
    """Build the section's controls; sets ``script.infotext_fields`` and ``script.paste_field_names``
    (what pasting an image's infotext fills in) and returns the controls in ``SECTION_ARGS`` order."""
    import gradio as gr
    from ..ui.tab import clamp_typed_values
    from modules.ui_components import InputAccordion, ToolButton
    tab = "img2img" if is_img2img else "txt2img"

    def eid(name: str) -> str:
        return f"dare_merge_xyz_{tab}_{name}"

    titles = checkpoint_titles()
    d = DEFAULTS
    with InputAccordion(False, label="DARE Merge", elem_id=eid("enabled")) as enabled:
        use_tab = gr.Checkbox(value=False, label="Use the DARE Merge tab's current recipe", elem_id=eid("use_tab"))
        with gr.Row():
            base = gr.Dropdown(choices=base_choices(titles), value=None, label="Base checkpoint", elem_id=eid("base"))
            models = gr.Dropdown(choices=titles, value=[], multiselect=True, label="Models to merge",
                                 elem_id=eid("models"))
            refresh = ToolButton(value="\U0001f504", elem_id=eid("refresh"))
        with gr.Row():
            method = gr.Dropdown(choices=list(METHODS), value=d["method"], label="Method", elem_id=eid("method"))
            weights = gr.Textbox(value="", label="Per-model weights", placeholder="empty: all 1",
                                 elem_id=eid("weights"))
            seed = gr.Number(value=d["seed"], precision=0, label="Merge seed", elem_id=eid("seed"))
        with gr.Row():
            p = gr.Slider(*SLIDER_RANGES["p"], value=d["p"], step=0.01, label="p (DARE drop rate)", elem_id=eid("p"))
            k = gr.Slider(*SLIDER_RANGES["k"], value=d["k"], step=0.01, label="k (TIES keep fraction)", elem_id=eid("k"))
            alpha = gr.Slider(*SLIDER_RANGES["alpha"], value=d["alpha"], step=0.01, label="alpha", elem_id=eid("alpha"))
            lam = gr.Slider(*SLIDER_RANGES["lam"], value=d["lam"], step=0.01, label="λ (DARE rescale)", elem_id=eid("lambda"))
        with gr.Row():
            vote_sgn = gr.Checkbox(value=d["vote_sgn"], label="vote_sgn (count signs)", elem_id=eid("vote_sgn"))
            split_alpha = gr.Checkbox(value=False, label="Per-component alpha", elem_id=eid("split_alpha"))
            alpha_unet = gr.Slider(*SLIDER_RANGES["alpha_unet"], value=1.0, step=0.01, label="alpha UNet", elem_id=eid("alpha_unet"))
            alpha_te = gr.Slider(*SLIDER_RANGES["alpha_te"], value=1.0, step=0.01, label="alpha TE", elem_id=eid("alpha_te"))
        with gr.Row():
            drop = gr.Button("Drop the merge input cache", elem_id=eid("drop_cache"))
            cache_status = gr.Textbox(value="", label="Input cache", interactive=False, lines=1,
                                      elem_id=eid("cache_status"))

    def refresh_lists(base_v, models_v):
        host.refresh_checkpoints()
        host.refresh_loras()
        choices = checkpoint_titles()
        bases = base_choices(choices)   # a LoRA is never a base
        return (gr.update(choices=bases, value=base_v if base_v in bases else None),
                gr.update(choices=choices, value=[m for m in (models_v or []) if m in choices]))

    refresh.click(refresh_lists, inputs=[base, models], outputs=[base, models])
    drop.click(lambda: drop_cache(), inputs=None, outputs=[cache_status])

    clamp_typed_values((("p", p), ("k", k), ("alpha", alpha), ("lam", lam), ("alpha_unet", alpha_unet),
                        ("alpha_te", alpha_te)))   # the tab's rule: the box shows the value the merge uses

    def pasted(key, convert=lambda v: v):
        return lambda params: convert(params[key]) if key in params else None

    script.infotext_fields = [
        (enabled, lambda params: has_recipe(params)),
        (use_tab, lambda params: False if has_recipe(params) else None),
        (base, pasted(PASTED_BASE)),
        (models, pasted(PASTED_MODELS)),
        (method, pasted(INFOTEXT_KEYS["method"])),
        (p, pasted(INFOTEXT_KEYS["p"])), (k, pasted(INFOTEXT_KEYS["k"])),
        (alpha, pasted(INFOTEXT_KEYS["alpha"])), (lam, pasted(INFOTEXT_KEYS["lam"])),
        (vote_sgn, pasted(INFOTEXT_KEYS["vote_sgn"])), (seed, pasted(INFOTEXT_KEYS["seed"])),
        (weights, lambda params: params.get(INFOTEXT_KEYS["weights"], "") if has_recipe(params) else None),
        (split_alpha, lambda params: (INFOTEXT_KEYS["alpha_unet"] in params or INFOTEXT_KEYS["alpha_te"] in params)
         if has_recipe(params) else None),
        (alpha_unet, pasted(INFOTEXT_KEYS["alpha_unet"])), (alpha_te, pasted(INFOTEXT_KEYS["alpha_te"])),
    ]
    script.paste_field_names = [INFOTEXT_KEYS[f] for f in INFOTEXT_KEYS] + [INFOTEXT_BASE, INFOTEXT_MODELS]
    return [enabled, use_tab, base, models, method, p, k, alpha, lam, vote_sgn, seed, weights, split_alpha,
            alpha_unet, alpha_te]


__all__ = ["build_section"]
