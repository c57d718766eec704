"""The tab's "Analysis" panel (issue 13): what the chosen models change, and what the last merge kept.

"Analyse" runs :func:`lib_merge.analysis.analyze` on the current selection (base, models and the
recipe's knobs, so the merge's share/kept/agreement are included) and shows the plots of
:mod:`lib_merge.analysis.plots` as PNG images (``gr.Image`` renders the same in gradio 3.41 and 4.40,
where ``gr.Plot`` differs), a few lines of summary, and the numbers as ``analysis.json`` to download.
After every Merge in the tab the panel shows that merge's own statistics, gathered during the merge
(``result.report.stats``), without a second pass over the weights.

The analysis runs like a merge: under ``host.run_exclusive`` (a WebUI's queue lock) on a thread, with a
progress line and its own Cancel.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from . import compat
from .compat import gr
from .host import TabHost
from .texts import error_text, progress_text

POLL_SECONDS = 0.4
IMAGE_ORDER = ("norms", "cosine", "conflict", "share", "kept")


def merge_stats(result: Any) -> dict | None:
    """The statistics a merge gathered while it ran (the schema's dict), or None when it has none."""
    report = getattr(result, "report", None)
    stats = getattr(report, "stats", None)
    return stats if isinstance(stats, dict) and stats.get("models") else None


def run_analysis(recipe, device: str, progress: Callable | None = None, cancel: Any = None) -> dict:
    """``analyze`` on a recipe's base and models, with its method and knobs (what the tab and route call)."""
    from ..analysis import analyze
    return analyze(recipe.base, list(recipe.models), recipe, device=device, progress=progress, cancel=cancel)


def _images(analysis: dict) -> dict[str, Any]:
    """name -> PIL image of each plot the analysis has numbers for."""
    from PIL import Image

    from ..analysis.plots import render_pngs
    return {name: Image.open(io.BytesIO(data)) for name, data in render_pngs(analysis).items()}


@dataclass
class AnalysisPanel:
    """The panel's components (for the tab to wire a merge's ``.then``) and its per-tab state."""

    host: TabHost
    images: dict[str, Any]
    summary: Any
    json_file: Any
    shown: dict[str, Any] = field(default_factory=lambda: {"result": None})
    token: dict[str, Any] = field(default_factory=lambda: {"cancel": None})
    folder: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="dare-merge-analysis-"))

    @property
    def outputs(self) -> list:
        return [self.summary, self.json_file, *self.images.values()]

    def _json_path(self, analysis: dict) -> str:
        path = os.path.join(self.folder, "analysis.json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(analysis, handle, indent=1)
        return path

    def show(self, analysis: dict, heading: str) -> list:
        """Updates for :attr:`outputs` showing ``analysis`` (plots it lacks are hidden)."""
        from ..analysis.plots import summary_text
        try:
            images = _images(analysis)
            text = f"{heading}\n{summary_text(analysis)}"
            path = self._json_path(analysis)
        except Exception as exc:   # a plot that cannot be drawn is one line, never a broken page
            return [error_text(exc), compat.update(), *[compat.update() for _ in self.images]]
        return [text, compat.update(value=path, visible=True),
                *[compat.update(value=images[n], visible=True) if n in images else compat.update(value=None,
                                                                                                 visible=False)
                  for n in self.images]]

    def keep(self, text: str) -> list:
        """Updates that change only the summary line (progress, errors)."""
        return [text, compat.update(), *[compat.update() for _ in self.images]]

    def after_merge(self) -> list:
        """After the tab's Merge: the new merge's own statistics (nothing changes when no new merge exists)."""
        result = self.host.session.result
        if result is None or result is self.shown["result"]:
            return self.keep_all()
        self.shown["result"] = result
        stats = merge_stats(result)
        if stats is None:
            return self.keep(f"merge {result.name}: it gathered no statistics; press Analyse")
        return self.show(stats, f"statistics of the merge {result.name}, gathered while it ran:")

    def keep_all(self) -> list:
        return [compat.update() for _ in self.outputs]

    def analyse(self, recipe, device: str, poll_seconds: float = POLL_SECONDS) -> Iterator[list]:
        """Run the analysis on a thread; yield progress lines, then the plots (or one error line)."""
        from ..engine import CancelToken
        token = CancelToken()
        self.token["cancel"] = token
        state: dict[str, Any] = {"ev": None}

        def progress(ev) -> None:
            state["ev"] = ev
            try:
                self.host.on_progress(ev)
            except Exception:  # a host's progress bar must never break the analysis
                pass

        def runner() -> None:
            try:
                state["result"] = self.host.run_exclusive(lambda: run_analysis(recipe, device, progress, token))
            except BaseException as exc:  # reported in the summary box
                state["error"] = exc

        thread = threading.Thread(target=runner, name="dare-merge-analysis", daemon=True)
        thread.start()
        last = None
        try:
            while thread.is_alive():
                text = progress_text(state["ev"], "analysing")
                if text != last:
                    last = text
                    yield self.keep(text)
                thread.join(poll_seconds)
        finally:
            self.token["cancel"] = None
        if "error" in state:
            yield self.keep(_analysis_error(state["error"]))
        else:
            models = ", ".join(os.path.basename(m) for m in recipe.models)
            yield self.show(state["result"], f"analysis of {models} against {os.path.basename(recipe.base)}:")

    def cancel(self) -> str | None:
        token = self.token["cancel"]
        if token is None:
            return None
        token.cancel()
        return "cancelling the analysis…"


def _analysis_error(exc: BaseException) -> str:
    from ..errors import MergeCancelled
    if isinstance(exc, MergeCancelled):
        return "cancelled: the analysis was stopped"
    return error_text(exc)


def build_analysis(host: TabHost, form_inputs: Sequence, device, checked_recipe: Callable) -> AnalysisPanel:
    """The panel inside the caller's layout; ``checked_recipe(form_values, device, resolve)`` is the tab's own
    form check, so Analyse refuses exactly what Merge refuses."""
    from ..analysis.plots import TITLES
    with gr.Accordion("Analysis: see inside a merge", open=False, elem_id="dare_merge_analysis"):
        with gr.Row():
            analyse = gr.Button("Analyse", variant="secondary", elem_id="dare_merge_analyse")
            cancel = gr.Button("Cancel analysis", elem_id="dare_merge_analysis_cancel")
        summary = gr.Textbox(value="Analyse shows, for the base and models picked above, how much each model "
                                   "changes per block, how alike they are, where they disagree, and what the "
                                   "merge keeps of each. After a Merge, that merge's figures appear here.",
                             label="Summary", lines=4, max_lines=20, interactive=False,
                             elem_id="dare_merge_analysis_summary")
        json_file = gr.File(label="analysis.json", interactive=False, visible=False,
                            elem_id="dare_merge_analysis_json")
        images = {}

        def image(name: str) -> None:
            # the figure carries its own title; a PNG (not gr.Plot) looks the same in gradio 3.41 and 4.40
            images[name] = gr.Image(value=None, label=TITLES[name], type="pil", interactive=False, visible=False,
                                    show_label=False, elem_id=f"dare_merge_analysis_{name}")

        image("norms")
        with gr.Row():   # the square cosine matrix beside the conflict bars, not stretched to the full width
            with gr.Column(scale=2, min_width=320):
                image("cosine")
            with gr.Column(scale=3, min_width=320):
                image("conflict")
        image("share")
        image("kept")
    panel = AnalysisPanel(host, images, summary, json_file)

    def on_analyse(*values):
        *form_v, device_v = values
        try:
            recipe = checked_recipe(form_v, device_v, host.resolve)
        except Exception as exc:
            yield panel.keep(error_text(exc))
            return
        yield from panel.analyse(recipe, device_v)

    analyse.click(on_analyse, inputs=[*form_inputs, device], outputs=panel.outputs)

    def on_cancel():
        return panel.cancel() or "nothing is being analysed"

    cancel.click(on_cancel, inputs=None, outputs=[summary], queue=False)
    return panel


__all__ = ["AnalysisPanel", "build_analysis", "merge_stats", "run_analysis"]
