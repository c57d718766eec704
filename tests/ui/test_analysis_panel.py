"""The tab's Analysis panel (issue 13) in a real headless Chromium, served by gradio 3.41 and 4.40.

Analyse on the current selection shows the plots as images the browser decoded (non-zero natural size),
the summary, and analysis.json for download, whose numbers must be those `python -m lib_merge analyze`
writes for the same inputs; after a Merge the panel shows that merge's own statistics (the share plot)
without a second pass.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.parse

import pytest

from ui_support import ROOT, artifacts_dir, subprocess_env

PLOTS = ("norms", "cosine", "conflict", "share", "kept")
KNOBS = {"p": "0.3", "k": "0.5", "seed": "7"}   # DARE-TIES: a random drop and a trim, both seeded
NUMBERS = ("models", "blocks", "delta_norm", "whole_norm", "cosine", "sign_conflict", "share", "kept",
           "elected_agreement")


def _cli_analyze(models_dir: str, files: dict, out: str) -> subprocess.Popen:
    """The same selection through the CLI (started early: it runs while the browser works)."""
    cmd = [sys.executable, "-m", "lib_merge", "analyze", "--device", "cpu",
           "--base", os.path.join(models_dir, files["base"]),
           "--models", os.path.join(models_dir, files["ft1"]), os.path.join(models_dir, files["ft2"]),
           "--method", "dare_ties", "--p", KNOBS["p"], "--k", KNOBS["k"], "--alpha", "1", "--lambda", "1",
           "--seed", KNOBS["seed"], "--out", out]
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _summary(page) -> str:
    return page.input_value("#dare_merge_analysis_summary textarea")


def _wait_summary(page, *prefixes: str, timeout: float = 180.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = _summary(page)
        if text.startswith(prefixes + ("error", "cancelled")):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"the analysis summary never reached {prefixes}: {text!r}")
        page.wait_for_timeout(250)


def _analyse(page, *prefixes: str, timeout: float = 180.0) -> str:
    """Click Analyse from a known summary (Cancel while idle says so) and wait for the outcome."""
    page.locator("#dare_merge_analysis_cancel").click()
    page.wait_for_function("() => document.querySelector('#dare_merge_analysis_summary textarea')?.value"
                           " === 'nothing is being analysed'", timeout=15_000)
    page.locator("#dare_merge_analyse").click()
    return _wait_summary(page, *prefixes, timeout=timeout)


def _image(page, name: str, timeout: float = 30_000) -> dict:
    """Wait until the plot's <img> is decoded; return its src and natural size."""
    selector = f"#dare_merge_analysis_{name} img"
    page.wait_for_function("(s) => { const i = document.querySelector(s); "
                           "return i && i.complete && i.naturalWidth > 0 && i.naturalHeight > 0; }",
                           arg=selector, timeout=timeout)
    return page.eval_on_selector(selector, "i => ({src: i.src, w: i.naturalWidth, h: i.naturalHeight, "
                                           "shown: i.getBoundingClientRect().width})")


def _close(a, b, path="", rel=1e-6, abs_tol=1e-9) -> None:
    """Equal JSON, numbers within ``rel`` / ``abs_tol`` (the same code on the same machine: really equal)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            _close(a[key], b[key], f"{path}.{key}", rel, abs_tol)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]", rel, abs_tol)
    elif isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None and math.isclose(a, b, rel_tol=rel, abs_tol=abs_tol), \
            f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def test_analyse_shows_the_plots_and_a_merge_shows_its_share(tab_page, server, ui_checkpoints, tmp_path):
    files = ui_checkpoints["files"]
    cli = _cli_analyze(server.models_dir, files, str(tmp_path / "cli"))
    ui = tab_page.open(server.url)
    page = ui.page
    tag = "gradio" + server.gradio
    page.locator("#dare_merge_analysis").click()   # open the accordion

    # a mistake is one line, like Merge's
    assert _analyse(page, "error") == "error: pick a base checkpoint first"

    ui.pick("dare_merge_base", files["base"])
    ui.pick("dare_merge_models", files["ft1"])
    ui.pick("dare_merge_models", files["ft2"])
    ui.pick("dare_merge_method", "DARE-TIES")
    ui.wait_number("dare_merge_p", 0.5)
    for knob, value in KNOBS.items():
        ui.set_number(f"dare_merge_{knob}", value)
    ui.wait_number("dare_merge_p", float(KNOBS["p"]))
    ui.wait_number("dare_merge_k", float(KNOBS["k"]))

    text = _analyse(page, "analysis of")
    assert text.startswith(f"analysis of {files['ft1']}, {files['ft2']} against {files['base']}:"), text
    assert "biggest change" in text and "largest share" in text and "Traceback" not in text, text
    shown = {name: _image(page, name) for name in PLOTS}
    for name, img in shown.items():
        assert img["w"] >= 400 and img["h"] >= 200 and img["shown"] > 100, (name, img)
    page.screenshot(path=os.path.join(artifacts_dir(), f"ui-analysis-{tag}.png"), full_page=True)

    # analysis.json from the page == the CLI's analysis.json for the same inputs
    href = page.get_attribute("#dare_merge_analysis_json a[download], #dare_merge_analysis_json a", "href")
    assert href, "no analysis.json link"
    answer = page.request.get(urllib.parse.urljoin(server.url, href))
    assert answer.ok, answer.status
    from_tab = json.loads(answer.body())
    out, _ = cli.communicate(timeout=600)
    assert cli.returncode == 0, out
    with open(tmp_path / "cli" / "analysis.json", encoding="utf-8") as handle:
        from_cli = json.load(handle)
    assert from_tab["models"] == [files["ft1"], files["ft2"]] and from_tab["method"] == "dare_ties"
    for field in NUMBERS:
        _close(from_tab[field], from_cli[field], field)

    # a Merge: the panel shows the statistics that merge gathered (no Analyse click)
    merged = ui.click_and_wait("dare_merge_run", "dare_ties merge", timeout=240)
    assert merged.startswith("dare_ties merge of a SD1.x model"), merged
    text = _wait_summary(page, "statistics of the merge")
    assert text.startswith("statistics of the merge dare-merge-dare_ties-"), text
    share = _image(page, "share")
    assert share["w"] >= 400 and share["h"] >= 200
    page.screenshot(path=os.path.join(artifacts_dir(), f"ui-analysis-{tag}-after-merge.png"), full_page=True)
    after = json.loads(page.request.get(urllib.parse.urljoin(
        server.url, page.get_attribute("#dare_merge_analysis_json a[download], #dare_merge_analysis_json a",
                                       "href"))).body())
    # the merge's own share/kept/agreement estimate the analysis's exact ones (same recipe; the merge counts a fixed
    # sample of chunks, engine.STATS_EVERY, to stay cheap), on the blocks the merge merged (the analysis also lists
    # the VAE, which differs but is taken from the base)
    blocks = after["blocks"]
    assert blocks == [b for b in from_cli["blocks"] if b != "VAE"]
    for field in ("share", "kept"):
        _close({m: {b: after[field][m][b] for b in blocks} for m in after["models"]},
               {m: {b: from_cli[field][m][b] for b in blocks} for m in after["models"]}, field, rel=0, abs_tol=0.01)
    _close({b: after["elected_agreement"][b] for b in blocks},
           {b: from_cli["elected_agreement"][b] for b in blocks}, "elected_agreement", rel=0, abs_tol=0.01)
    assert "Traceback" not in server.log()


def test_cancel_in_the_page_answers_while_idle(tab_page, server):
    page = tab_page.open(server.url).page
    page.locator("#dare_merge_analysis").click()
    page.locator("#dare_merge_analysis_cancel").click()
    page.wait_for_function("() => document.querySelector('#dare_merge_analysis_summary textarea')?.value"
                           " === 'nothing is being analysed'", timeout=15_000)


def _panel(host):
    from lib_merge.ui.analysis_panel import IMAGE_ORDER, AnalysisPanel
    return AnalysisPanel(host, {name: None for name in IMAGE_ORDER}, None, None)


def test_cancel_stops_a_running_analysis_and_says_so(ui_checkpoints):
    """What Cancel does, without the button (a tiny analysis ends before a click could land): the panel's
    token stops the analysis thread within a key, and the summary says so in words."""
    pytest.importorskip("gradio")
    from lib_merge.recipe import MergeRecipe
    from lib_merge.ui.host import FolderHost

    class CancellingHost(FolderHost):
        events = 0

        def on_progress(self, event):
            self.events += 1
            if self.events == 3:
                assert panel.cancel() is not None

    host = CancellingHost(ui_checkpoints["dir"], device="cpu")
    panel = _panel(host)
    files = ui_checkpoints["files"]
    recipe = MergeRecipe("dare_ties", host.resolve(files["base"]), [host.resolve(files["ft1"])], p=0.3)
    rows = list(panel.analyse(recipe, "cpu", poll_seconds=0.05))
    assert rows[0][0].startswith("analysing"), rows[0][0]
    assert rows[-1][0] == "cancelled: the analysis was stopped", rows[-1][0]
    assert host.events >= 3 and panel.cancel() is None


def test_after_a_merge_the_panel_shows_its_stats_once(ui_checkpoints):
    """The Merge button's follow-up: the new result's statistics once; nothing new (a failed merge) changes
    nothing."""
    pytest.importorskip("gradio")
    from lib_merge.recipe import MergeRecipe
    from lib_merge.ui import compat
    from lib_merge.ui.host import FolderHost
    host = FolderHost(ui_checkpoints["dir"], device="cpu")
    panel = _panel(host)
    files = ui_checkpoints["files"]
    assert all(u == compat.update() for u in panel.after_merge())    # nothing merged yet
    recipe = MergeRecipe("ties", host.resolve(files["base"]),
                         [host.resolve(files["ft1"]), host.resolve(files["ft2"])], k=0.4)
    result = host.session.merge(recipe, device="cpu", hot_load=False, stats=True)
    text, json_file, *images = panel.after_merge()
    assert text.startswith(f"statistics of the merge {result.name}, gathered while it ran:"), text
    stats = json.load(open(json_file["value"], encoding="utf-8"))
    assert stats["models"] == [files["ft1"], files["ft2"]] and stats["method"] == "ties"
    shown = dict(zip(("norms", "cosine", "conflict", "share", "kept"), images))
    assert shown["share"]["visible"] and shown["share"]["value"].size[0] >= 400
    assert all(u == compat.update() for u in panel.after_merge())    # the same result: no redraw
