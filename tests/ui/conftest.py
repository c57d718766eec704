"""Fixtures for the merge tab's tests: synthetic checkpoints, a served tab per gradio version, a browser.

See ui_support.py for how the server and Chromium are run and when tests skip.
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import Iterator

import pytest

from ui_support import (GRADIO4_PYTHON, Server, TabPage, artifacts_dir, gradio_version,
                        chromium, missing, standalone_server)


@pytest.fixture(scope="session")
def ui_checkpoints(tmp_path_factory) -> dict:
    """A small SD1 base and two fine-tunes (scale_down 8, fp16, real key names), written once."""
    import torch
    from lib_merge.synth import write_synthetic
    folder = tmp_path_factory.mktemp("ui-ckpts")
    files = {"base": "sd1-base.safetensors", "ft1": "sd1-ft1.safetensors", "ft2": "sd1-ft2.safetensors"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only cost time on a shared 2-core machine
    try:
        write_synthetic(str(folder / files["base"]), "sd1", "base", seed=0, scale_down=8)
        for i in (1, 2):
            write_synthetic(str(folder / files[f"ft{i}"]), "sd1", "finetune", seed=i, base_seed=0, scale_down=8)
    finally:
        torch.set_num_threads(threads)
    return {"dir": str(folder), "files": files}


def _python_for(which: str) -> tuple[str, str]:
    python = sys.executable if which == "gradio3" else GRADIO4_PYTHON
    version = gradio_version(python)
    want = "3." if which == "gradio3" else "4."
    if version is None:
        if which == "gradio4":
            pytest.skip(f"no gradio 4 environment at {python} (make it: see tests/ui/README.md)")
        missing(f"gradio is not installed for {python}")
    if not version.startswith(want):
        pytest.skip(f"{python} has gradio {version}, not {want}x")
    return python, version


@pytest.fixture(scope="module", params=["gradio3", "gradio4"])
def server(request, ui_checkpoints, tmp_path_factory) -> Iterator[Server]:
    """The standalone tab served by gradio 3.41 (project venv) or 4.40 (.venv-gradio4), one per module.

    Its models folder holds hard links to the synthetic checkpoints; merges are saved there.
    """
    python, version = _python_for(request.param)
    work = tmp_path_factory.mktemp(f"ui-{request.param}")
    models_dir = work / "models"
    models_dir.mkdir()
    for name in ui_checkpoints["files"].values():
        src = os.path.join(ui_checkpoints["dir"], name)
        try:
            os.link(src, models_dir / name)
        except OSError:
            shutil.copyfile(src, models_dir / name)
    log_path = str(work / "server.log")
    try:
        with standalone_server(python, str(models_dir), log_path, version) as srv:
            yield srv
    finally:
        if os.path.exists(log_path):
            module = os.path.splitext(os.path.basename(request.module.__file__))[0]
            shutil.copyfile(log_path, os.path.join(artifacts_dir(), f"server-{module}-gradio{version}.log"))


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium, one per test session."""
    with chromium() as launched:
        yield launched


@pytest.fixture
def tab_page(browser) -> Iterator[TabPage]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield TabPage(page)
    finally:
        context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"
