"""See inside a merge (issue 13) in a real A1111 / Forge: ``POST /dare-merge/v1/analyze``, the statistics in
the merge's answer, and the tab's Analysis panel in the WebUI's own page (A1111: gradio 3.41, Forge: 4.40).

One WebUI per host, with its page and ``--api`` (the full-size synthetic SD1 base and two fine-tunes of
tests/webui/conftest.py).  Run on one host at a time::

    flock /tmp/coord/webui.lock env FORGE_ROOT=/work/webui/forge \\
        .venv/bin/python -m pytest -x -q tests/webui/test_webui_analysis.py
"""
from __future__ import annotations

import math
import os
import sys

import pytest

from webui_support import REPO, hosts, serve

sys.path.insert(0, os.path.join(REPO, "tests", "ui"))
from ui_support import TabPage, artifacts_dir  # noqa: E402  (the tab's driver)

pytestmark = [pytest.mark.webui, pytest.mark.browser]
MODELS = ["dm_ft1.safetensors", "dm_ft2.safetensors"]
STATE: dict = {}


@pytest.fixture(scope="module", params=hosts())
def webui_ui(request, synthetic_checkpoints, tmp_path_factory):
    kind, root = request.param
    with serve(kind, root, synthetic_checkpoints, str(tmp_path_factory.mktemp(f"webui-analysis-{kind}")),
               ui=True) as server:
        yield server


def _flat(value, path: str = "") -> dict:
    """Nested JSON as {path: leaf} (pytest.approx compares flat mappings only)."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{path}.{key}").items()}
    return {path: value}


def _block_sums(table: dict, blocks: list[str]) -> list[float]:
    return [sum(table[m][b] for m in table if table[m][b] is not None) for b in blocks]


def test_analyze_route_answers_the_analysis_json(webui_ui):
    webui = webui_ui
    plain = webui.ok("POST", "/dare-merge/v1/analyze", {"base": "dm_base", "models": ["dm_ft1", "dm_ft2"]})
    assert plain["models"] == MODELS and plain["arch"] == "sd1" and plain["blocks"][:2] == ["BASE", "IN00"]
    assert "share" not in plain and "method" not in plain       # no method: the inputs alone
    for name in MODELS:
        blocks = plain["delta_norm"][name]
        recombined = math.sqrt(sum(v * v for v in blocks.values() if v is not None))
        assert math.isclose(recombined, plain["whole_norm"][name], rel_tol=1e-5)
    assert [plain["cosine"][i][i] for i in range(2)] == pytest.approx([1.0, 1.0])

    ties = webui.ok("POST", "/dare-merge/v1/analyze", {"base": "dm_base", "models": ["dm_ft1", "dm_ft2"],
                                                       "method": "ties", "k": 0.3, "device": "cpu"})
    assert ties["method"] == "ties" and _flat(ties["delta_norm"]) == pytest.approx(_flat(plain["delta_norm"]))
    merged_blocks = [b for b in ties["blocks"] if b != "VAE"]
    assert _block_sums(ties["share"], merged_blocks) == pytest.approx([1.0] * len(merged_blocks), abs=1e-6)
    # the trim keeps the top k of each key's elements; counted among the elements a model changes at all (fp16
    # rounds some small deltas to zero), so a little more than k
    kept = [ties["kept"][m]["IN04"] for m in MODELS]
    assert all(0.25 < v < 0.5 for v in kept), kept
    STATE["ties"] = ties


def test_analyze_route_refuses_bad_bodies_in_one_line(webui_ui):
    webui = webui_ui
    for body, words in (({"base": "dm_base", "models": ["dm_ft1"], "hot_load": True}, "unknown field"),
                        ({"base": "dm_base", "models": ["no_such_model"]}, "no_such_model"),
                        ({"base": "dm_base", "models": ["dm_ft1"], "method": "ties", "k": 7}, "k"),
                        ({"base": "dm_base", "models": []}, "models")):
        status, answer = webui.request("POST", "/dare-merge/v1/analyze", body)
        assert status == 400, (body, status, answer)
        assert words in answer["error"] and "\n" not in answer["error"] and "Traceback" not in answer["error"]
    status, _ = webui.request("POST", "/dare-merge/v1/analyze", {"base": "dm_base", "models": ["dm_ft1"]},
                              auth=False)
    assert status == 401                               # behind --api-auth like the other routes


def test_the_merge_answer_carries_its_statistics(webui_ui):
    webui = webui_ui
    answer = webui.ok("POST", "/dare-merge/v1/merge", {"base": "dm_base", "models": ["dm_ft1", "dm_ft2"],
                                                       "method": "ties", "k": 0.3, "hot_load": True,
                                                       "device": "cpu"})
    stats = answer["stats"]
    assert stats is not None and stats["models"] == MODELS and stats["method"] == "ties"
    ties = STATE.get("ties")
    if ties is not None:   # the same recipe analysed: the merge's own pass estimates the same numbers (it counts a
        # fixed sample of chunks, engine.STATS_EVERY; analyze counts all)
        blocks = stats["blocks"]   # the analysis also lists the VAE (it differs), which the merge takes from the base
        assert blocks == [b for b in ties["blocks"] if b != "VAE"]
        for field in ("share", "kept"):
            assert _flat({m: {b: stats[field][m][b] for b in blocks} for m in MODELS}) == pytest.approx(
                _flat({m: {b: ties[field][m][b] for b in blocks} for m in MODELS}), rel=0, abs=0.01), field
        assert [stats["elected_agreement"][b] for b in blocks] == pytest.approx(
            [ties["elected_agreement"][b] for b in blocks], rel=0, abs=0.01)


def _image(page, name: str) -> dict:
    selector = f"#dare_merge_analysis_{name} img"
    page.wait_for_function("(s) => { const i = document.querySelector(s); "
                           "return i && i.complete && i.naturalWidth > 0; }", arg=selector, timeout=60_000)
    return page.eval_on_selector(selector, "i => ({w: i.naturalWidth, h: i.naturalHeight, "
                                           "shown: i.getBoundingClientRect().width})")


def test_the_panel_in_the_webui_page_shows_the_plots(webui_ui, page):
    webui = webui_ui
    titles = {os.path.splitext(m["title"].split(" [")[0])[0]: m["title"]
              for m in webui.ok("GET", "/sdapi/v1/sd-models")}
    page.goto(webui.url, timeout=180_000)
    page.locator("#tabs button:has-text('DARE Merge')").first.click(timeout=180_000)
    page.wait_for_selector("#dare_merge_run", state="visible", timeout=60_000)
    ui = TabPage(page)
    page.locator("#dare_merge_base_refresh").click()
    page.locator("#dare_merge_models_refresh").click()
    ui.pick("dare_merge_base", titles["dm_base"])
    ui.pick("dare_merge_models", titles["dm_ft1"])
    ui.pick("dare_merge_models", titles["dm_ft2"])
    ui.pick("dare_merge_method", "TIES")
    page.locator("#dare_merge_analysis").click()
    page.locator("#dare_merge_analyse").click()
    page.wait_for_function("() => /^(analysis of|error)/.test(document.querySelector("
                           "'#dare_merge_analysis_summary textarea')?.value || '')", timeout=900_000)
    text = page.input_value("#dare_merge_analysis_summary textarea")
    assert text.startswith("analysis of dm_ft1.safetensors, dm_ft2.safetensors against dm_base"), text
    for name in ("norms", "cosine", "conflict", "share", "kept"):
        img = _image(page, name)
        assert img["w"] >= 400 and img["h"] >= 200 and img["shown"] > 100, (name, img)
    page.screenshot(path=os.path.join(artifacts_dir(), f"webui-{webui.kind}-analysis.png"), full_page=True)
