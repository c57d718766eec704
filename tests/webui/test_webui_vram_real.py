"""What the WebUI decides about VRAM, seen from a real A1111/Forge (issue 17): the merge device and its
note, the host's low-VRAM mode and the X/Y/Z input cache's GPU budget, through the status routes.

These WebUIs run on the CPU here, so the merge device is the CPU with no note and the GPU tier is off;
``tests/webui/test_webui_storage_modes.py`` checks that A1111's ``--lowvram`` is seen as a low-VRAM mode.
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.webui


def test_status_names_the_merge_device_and_the_vram_mode(webui):
    status = webui.ok("GET", "/dare-merge/v1/status")
    assert status["settings"]["device"] == "cpu" and status["settings"]["device_note"] == "", status["settings"]
    vram = webui.ok("GET", "/dare-merge/v1/xyz")["vram"]
    assert vram == {"merge_device": "cpu", "device_note": "", "setting_mb": -1, "low_vram": False,
                    "host": webui.kind, "in_grid": False, "grid_budget_mb": None}, vram


def test_cuda_setting_without_cuda_merges_on_the_cpu(webui):
    webui.ok("POST", "/sdapi/v1/options", {"dare_merge_device": "cuda"})
    try:
        status = webui.ok("GET", "/dare-merge/v1/status")
        assert status["settings"]["device"] == "cpu"
        assert "CUDA is not available" in status["settings"]["device_note"], status["settings"]
    finally:
        webui.ok("POST", "/sdapi/v1/options", {"dare_merge_device": "auto"})
