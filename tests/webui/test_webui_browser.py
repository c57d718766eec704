"""The DARE Merge tab inside the real WebUI's page (A1111: gradio 3.41, Forge: gradio 4.40), in Chromium.

A user's path: open the WebUI, switch to the tab, pick base and models, pick
a preset, merge with hot-load; the WebUI's own progress API shows the merge
(``shared.state``), the next txt2img is made with the merge, "Restore
original" puts the checkpoint back.  Also: the tab lists the WebUI's
checkpoints but never the in-memory merge, and the settings section exists.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time

import pytest

from webui_support import REPO, hosts, serve

sys.path.insert(0, os.path.join(REPO, "tests", "ui"))
from ui_support import TabPage, artifacts_dir  # noqa: E402  (the tab's driver)

pytestmark = [pytest.mark.webui, pytest.mark.browser]


@pytest.fixture(scope="module", params=hosts())
def webui_ui(request, synthetic_checkpoints, tmp_path_factory):
    kind, root = request.param
    with serve(kind, root, synthetic_checkpoints, str(tmp_path_factory.mktemp(f"webui-ui-{kind}")),
               ui=True) as server:
        yield server


def _infotext_model(infotext: str) -> tuple[str, str]:
    params = dict(re.findall(r"([A-Za-z][\w ]*?): ([^,]+)(?:, |$)", infotext.strip().splitlines()[-1]))
    return params["Model"], params["Model hash"]


def test_merge_from_the_tab_hot_loads_shows_progress_and_restores(webui_ui, page):
    webui = webui_ui
    _, infotext = webui.txt2img()          # loads the model (Forge loads lazily)
    original = _infotext_model(infotext)
    titles = {os.path.splitext(m["title"].split(" [")[0])[0]: m["title"]
              for m in webui.ok("GET", "/sdapi/v1/sd-models")}

    page.goto(webui.url, timeout=180_000)
    page.locator("#tabs button:has-text('DARE Merge')").first.click(timeout=180_000)
    ui = TabPage(page)
    page.wait_for_selector("#dare_merge_run", state="visible", timeout=60_000)
    assert page.locator("#setting_dare_merge_device").count() == 1, "no DARE Merge settings section"
    assert page.is_visible("#dare_merge_restore") and page.is_checked("#dare_merge_hot_load input")

    # titles gain their hash once the WebUI has hashed a file (here: after the page was built)
    page.locator("#dare_merge_base_refresh").click()
    page.locator("#dare_merge_models_refresh").click()
    ui.reset_status()
    ui.pick("dare_merge_base", titles["dm_base"])
    ui.pick("dare_merge_models", titles["dm_ft1"])
    ui.pick("dare_merge_models", titles["dm_ft2"])
    ui.pick("dare_merge_method", "Weighted sum")
    ui.set_number("dare_merge_alpha", "0.5")
    ui.wait_number("dare_merge_alpha", 0.5)

    seen: dict[str, set] = {"job": set(), "textinfo": set()}
    stop = threading.Event()

    def watch_progress():
        while not stop.is_set():
            status, body = webui.request("GET", "/sdapi/v1/progress?skip_current_image=true", timeout=30)
            if status == 200:
                seen["job"].add(body["state"]["job"])
                seen["textinfo"].add((body.get("textinfo") or "")[:11])
            time.sleep(0.5)

    watcher = threading.Thread(target=watch_progress, daemon=True)
    watcher.start()
    try:
        merged = ui.click_and_wait("dare_merge_run", "weighted_sum merge", timeout=2400)
    finally:
        stop.set()
        watcher.join(60)
    assert "hot-loaded into the running model" in merged, merged
    assert "DARE merge" in seen["job"] and "DARE merge:" in seen["textinfo"], seen
    page.screenshot(path=os.path.join(artifacts_dir(), f"webui-{webui.kind}-tab-merged.png"), full_page=True)

    status = webui.ok("GET", "/dare-merge/v1/status")
    assert status["loaded_recipe_hash"] and status["merges_performed"] == 1, status
    name = status["current"]["name"]
    _, infotext = webui.txt2img()
    assert _infotext_model(infotext) == (name, status["loaded_recipe_hash"]), infotext

    # the merge is selectable in the WebUI's checkpoint list, but not offered as a merge input
    page.locator("#dare_merge_base_refresh").click()
    page.locator("#dare_merge_base input").first.click()
    options = page.locator("#dare_merge_base ul li").all_inner_texts()
    page.locator("#dare_merge_method_help").first.click()
    assert options and not any(name in o for o in options), options

    restored = ui.click_and_wait("dare_merge_restore", "restored", timeout=600)
    assert restored.startswith(f"restored {titles['dm_base']}"), restored
    _, infotext = webui.txt2img()
    assert _infotext_model(infotext) == original, infotext
    assert webui.ok("GET", "/dare-merge/v1/status")["loaded_recipe_hash"] is None


def test_api_merge_with_a_task_id_shows_in_the_pages_progress(webui_ui):
    """``task_id`` makes the merge visible to ``/internal/progress``, which the page's progress bar polls."""
    webui = webui_ui
    task = "task(dare-merge-test-1)"
    seen = {"active": False, "textinfo": set(), "completed": False}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            status, body = webui.request("POST", "/internal/progress",
                                         {"id_task": task, "id_live_preview": -1, "live_preview": False})
            if status == 200:
                seen["active"] |= bool(body.get("active"))
                seen["completed"] |= bool(body.get("completed"))
                seen["textinfo"].add((body.get("textinfo") or "")[:11])
            time.sleep(0.3)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        answer = webui.ok("POST", "/dare-merge/v1/merge", {
            "base": "dm_base", "models": ["dm_ft1", "dm_ft2"], "method": "weighted_sum", "alpha": 0.6,
            "task_id": task})
        time.sleep(1.5)
    finally:
        stop.set()
        watcher.join(60)
    assert not answer["reused"], answer
    assert seen["active"] and "DARE merge:" in seen["textinfo"] and seen["completed"], seen
