"""The self-test button in the tab's Advanced section (issue 17): it runs under the host's lock, streams
which check is running, then shows lib_merge.selftest's report text, or the error in words.

The self-test itself is tested by the CLI's tests; here its checks are replaced by two quick ones so the
panel's threading, lock and rendering are what runs (a real self-test takes minutes on a CPU).
"""
from __future__ import annotations

import threading

import pytest

import lib_merge.selftest as selftest
from lib_merge.errors import MergeError
from lib_merge.ui.host import FolderHost
from lib_merge.ui.selftest_panel import selftest_texts


class LockingHost(FolderHost):
    """A FolderHost whose run_exclusive holds a lock, as a WebUI's queue lock does."""

    def __init__(self, folder: str) -> None:
        super().__init__(folder)
        self.lock = threading.Lock()
        self.exclusive_calls = 0

    def run_exclusive(self, fn, task_id=None):
        with self.lock:
            self.exclusive_calls += 1
            return fn()


def _report(device: str, arch: str) -> dict:
    checks = [{"name": "trim threshold 64x32", "status": "PASS", "detail": "exact at 3 ranks", "seconds": 0.1,
               "figures": {}},
              {"name": "peak VRAM within the cache budget", "status": "SKIP", "detail": "no CUDA device",
               "seconds": 0.0, "figures": {}}]
    return {"torch": "2.1.2 (CPU build)", "python": "3.11.7", "platform": "Linux", "lib_merge": "0.1.0",
            "device": device, "device_name": device, "device_note": "", "arch": arch, "scale_down": 16,
            "seconds": 0.2, "checks": checks, "ok": True,
            "counts": {"PASS": 1, "FAIL": 0, "SKIP": 1, "INFO": 0}}


def test_report_after_progress_lines(tmp_path, monkeypatch):
    host = LockingHost(str(tmp_path))
    calls = []
    release = threading.Event()

    def run_selftest(device, arch, progress=None, *args, **kwargs):
        assert host.lock.locked(), "the self-test must run under the host's lock"
        calls.append((device, arch))
        progress(1, 2, "trim threshold 64x32")
        release.wait(5)
        progress(2, 2, "peak VRAM within the cache budget")
        return _report(device, arch)

    monkeypatch.setattr(selftest, "run_selftest", run_selftest)
    texts = selftest_texts(host, "cpu", "sdxl", poll_seconds=0.05)
    first = next(texts)
    assert first.startswith("self-test on cpu (sdxl)")
    seen = [first]
    for text in texts:
        seen.append(text)
        if "check 1 of 2" in text:
            release.set()
    assert calls == [("cpu", "sdxl")] and host.exclusive_calls == 1
    assert any("check 1 of 2, trim threshold 64x32" in t for t in seen)
    report = seen[-1]
    assert report.startswith("DARE merge self-test passed")
    assert "[PASS] trim threshold 64x32: exact at 3 ranks" in report and "1 passed, 0 failed, 1 skipped" in report


def test_an_error_is_one_line_in_the_report_box(tmp_path, monkeypatch):
    def run_selftest(device, arch, progress=None, *args, **kwargs):
        raise MergeError("merging on the CPU: cuda:3 was asked for but this machine has 1 CUDA device; "
                         "run the self-test with --device cpu")

    monkeypatch.setattr(selftest, "run_selftest", run_selftest)
    texts = list(selftest_texts(FolderHost(str(tmp_path)), "cuda:3", "sd1", poll_seconds=0.05))
    assert "cuda:3 was asked for" in texts[-1] and "Traceback" not in texts[-1]


def test_the_tab_has_the_button_next_to_the_device(tmp_path):
    pytest.importorskip("gradio")
    from lib_merge.ui.tab import build_tab
    tab = build_tab(FolderHost(str(tmp_path)))
    ids = [getattr(block, "elem_id", None) for block in tab.blocks.values()]
    for elem in ("dare_merge_selftest_run", "dare_merge_selftest_report", "dare_merge_selftest_arch"):
        assert elem in ids
    assert ids.index("dare_merge_device") < ids.index("dare_merge_selftest_run")
