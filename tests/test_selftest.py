"""The self-test: on a CPU its checks pass or skip with a reason, and a broken kernel turns a check to FAIL."""
from __future__ import annotations

import json

import pytest
import torch

import lib_merge.kernels as kernels
import lib_merge.select as select
from lib_merge import selftest
from lib_merge.cli import main
from lib_merge.methods import METHODS

SMALL_TRIM = ((96, 1280),)   # SDXL's row width, few rows: the radix path (> 2^16 elements) in a fraction of a second


def _by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    steps = []
    report = selftest.run_selftest("cpu", "sd1", progress=lambda *a: steps.append(a), scale_down=32,
                                   workdir=str(tmp_path_factory.mktemp("selftest")), trim_shapes=SMALL_TRIM,
                                   quick=True)
    return report, steps


def test_cpu_report(cpu_report):
    report, steps = cpu_report
    checks = _by_name(report)
    assert report["ok"] and report["counts"]["FAIL"] == 0, selftest.format_report(report)
    assert report["device"] == "cpu" and report["torch"].startswith(torch.__version__)
    for method in METHODS:
        assert checks[f"cpu chunks = cpu whole keys: {method}"]["status"] == "PASS"
        device_check = checks[f"cuda = cpu: {method}"]
        assert device_check["status"] == "SKIP" and "no CUDA" in device_check["detail"]
    trim = checks["trim threshold 96x1280"]
    assert trim["status"] == "PASS"
    assert [r["k"] for r in trim["figures"]["ranks"]] == list(selftest.TRIM_KEEP)
    assert all(r["threshold"] == r["kthvalue_cpu"] for r in trim["figures"]["ranks"])
    assert checks["merged tensors end on the CPU"]["status"] == "PASS"
    for name in ("peak VRAM within the cache budget", "cache frees its VRAM after drop",
                 "out of memory: cache dropped, merge retried on the CPU"):
        assert checks[name]["status"] == "SKIP" and "no CUDA" in checks[name]["detail"]
    timing = checks["timings: merge vs I/O floor, cell re-merge from the cache"]
    assert timing["status"] == "INFO"
    assert timing["figures"]["io_floor_s"] > 0 and timing["figures"]["cell_remerge_s"] > 0
    assert [s[0] for s in steps] == list(range(1, len(report["checks"]) + 1))
    assert all(s[1] == len(report["checks"]) for s in steps)


def test_report_text_and_json(cpu_report, tmp_path):
    report, _ = cpu_report
    text = selftest.format_report(report)
    assert text.splitlines()[0] == "DARE merge self-test passed"
    assert f"torch {torch.__version__}" in text and "device: cpu" in text
    assert "[SKIP] peak VRAM within the cache budget: no CUDA device" in text
    assert text.count("[PASS]") == report["counts"]["PASS"]
    path = selftest.write_report_json(report, str(tmp_path / "r.json"))
    with open(path, encoding="utf-8") as f:
        assert json.load(f) == json.loads(json.dumps(report))


def test_a_broken_kernel_fails_the_identity_check(tmp_path, monkeypatch):
    real = kernels.delta_merge_fused

    def off_by_chunk(theta0, thetas, weights, params, workspace, masks, thresholds, start, **kw):
        result = real(theta0, thetas, weights, params, workspace, masks, thresholds, start, **kw)
        return result + 1e-2 if start > 0 else result   # wrong only where a chunk starts inside a key

    monkeypatch.setattr(kernels, "delta_merge_fused", off_by_chunk)
    real_select = select.kth_smallest_pattern
    monkeypatch.setattr(select, "kth_smallest_pattern", lambda bits, kk: real_select(bits, kk) + 1)
    monkeypatch.setattr(selftest._SelfTest, "check_timings", lambda self: (selftest.PASS, "not timed here", {}))
    monkeypatch.setattr(selftest, "CHECK_METHODS", ("weighted_sum", "ties", "dare_ties"))
    report = selftest.run_selftest("cpu", "sd1", scale_down=32, workdir=str(tmp_path), trim_shapes=SMALL_TRIM,
                                   quick=True)
    checks = _by_name(report)
    assert not report["ok"]
    failed = checks["cpu chunks = cpu whole keys: dare_ties"]
    assert failed["status"] == "FAIL" and "keys differ" in failed["detail"] and failed["figures"]["differing"] > 0
    assert checks["cpu chunks = cpu whole keys: weighted_sum"]["status"] == "PASS"   # another kernel
    assert checks["trim threshold 96x1280"]["status"] == "FAIL"
    text = selftest.format_report(report)
    assert text.startswith("DARE merge self-test FAILED") and "[FAIL] cpu chunks = cpu whole keys: ties" in text


def test_a_crashing_check_is_one_fail_line(tmp_path, monkeypatch):
    def boom(self):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(selftest._SelfTest, "check_locations", boom)
    monkeypatch.setattr(selftest, "CHECK_METHODS", ("weighted_sum",))
    report = selftest.run_selftest("cpu", "sd1", scale_down=32, workdir=str(tmp_path), trim_shapes=SMALL_TRIM,
                                   quick=True)
    check = _by_name(report)["merged tensors end on the CPU"]
    assert check["status"] == "FAIL" and check["detail"] == "RuntimeError: kernel exploded"


def test_cli_selftest(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(selftest, "TRIM_SHAPES", SMALL_TRIM)
    monkeypatch.setattr(selftest, "CHECK_METHODS", ("ties", "slerp"))
    for slow in ("check_locations", "check_timings"):   # run in test_cpu_report; here the CLI is under test
        monkeypatch.setattr(selftest._SelfTest, slow, lambda self: (selftest.PASS, "stubbed", {}))
    out = tmp_path / "report.json"
    assert main(["selftest", "--device", "cpu", "--arch", "sdxl", "--scale-down", "32", "--quick",
                 "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("DARE merge self-test passed") and str(out) in captured.out
    assert "[1/" in captured.err   # progress on stderr, the report alone on stdout
    report = json.loads(out.read_text())
    assert report["arch"] == "sdxl" and report["ok"] and report["format"] == selftest.REPORT_FORMAT
    assert report["quick"] and "quick (a sample of keys)" in captured.out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_selftest_on_cuda_without_cuda_is_one_line(capsys):
    assert main(["selftest", "--device", "cuda", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cuda is not usable here (cuda was asked for but CUDA is not available")
    assert torch.__version__ in err
    assert "--device cpu" in err and err.count("\n") == 1


def test_cli_selftest_refuses_a_bad_scale(capsys):
    assert main(["selftest", "--device", "cpu", "--scale-down", "0", "--quiet"]) == 2
    assert "--scale-down must be at least 1" in capsys.readouterr().err
