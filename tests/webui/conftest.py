"""Fixtures for the real-WebUI tests (helpers and the how/why are in webui_support.py)."""
from __future__ import annotations

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from webui_support import FILES, REPO, data_dir, hosts, serve  # noqa: E402

sys.path.insert(0, os.path.join(REPO, "tests", "ui"))
from ui_support import chromium  # noqa: E402  (the tab's browser driver)


@pytest.fixture
def page():
    """A fresh page in headless Chromium for a test that drives a real WebUI's page."""
    with chromium() as browser:
        context = browser.new_context(viewport={"width": 1400, "height": 1100})
        try:
            yield context.new_page()
        finally:
            context.close()


@pytest.fixture(scope="session")
def synthetic_checkpoints():
    """Full-size SD1 base (seed 0) and fine-tunes 1 and 2 of it, written once and reused."""
    sys.path.insert(0, REPO)
    from lib_merge.synth import write_synthetic
    folder = data_dir()
    os.makedirs(folder, exist_ok=True)
    paths = {k: os.path.join(folder, v) for k, v in FILES.items()}
    if not os.path.exists(paths["base"]):
        write_synthetic(paths["base"], "sd1", "base", seed=0, scale_down=1)
    for seed, key in ((1, "ft1"), (2, "ft2")):
        if not os.path.exists(paths[key]):
            write_synthetic(paths[key], "sd1", "finetune", seed=seed, base_seed=0, scale_down=1)
    yield paths
    if os.environ.get("DARE_MERGE_WEBUI_KEEP_DATA", "1") == "0":
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module", params=hosts())
def webui(request, synthetic_checkpoints, tmp_path_factory):
    kind, root = request.param
    with serve(kind, root, synthetic_checkpoints, str(tmp_path_factory.mktemp(f"webui-{kind}"))) as server:
        yield server
