"""``python -m lib_merge analyze``: analysis.json + plots, one-line errors with exit 2; ``merge`` prints the shares."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from lib_merge.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def test_analyze_writes_the_json_and_the_plots(sd1_set, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["analyze", "--base", sd1_set["base"], "--models", *sd1_set["models"][:2], "--out", str(out),
                 "--quiet"])
    captured = capsys.readouterr()
    printed = captured.out
    doc = json.loads((out / "analysis.json").read_text())
    assert doc["models"] == ["ft1.safetensors", "ft2.safetensors"] and "share" not in doc
    assert f"wrote {out / 'analysis.json'}" in printed and "task vector norm" in printed
    if not _has_matplotlib():   # the WebUIs ship it; a bare library install may not: the JSON, then one line
        assert code == 2 and "need matplotlib" in captured.err and len(captured.err.strip().splitlines()) == 1
        return
    assert code == 0
    pngs = sorted(p.name for p in out.iterdir() if p.suffix == ".png")
    assert pngs and all(f"wrote {out / name}" in printed for name in pngs)


def test_analyze_with_a_method_reports_the_merge(sd1_set, tmp_path, capsys):
    out = tmp_path / "ties"
    code = main(["analyze", "--base", sd1_set["base"], "--models", *sd1_set["models"], "--method", "ties",
                 "--k", "0.3", "--out", str(out), "--quiet", "--no-plots"])
    printed = capsys.readouterr().out
    assert code == 0
    doc = json.loads((out / "analysis.json").read_text())
    assert doc["method"] == "ties" and doc["recipe"]["k"] == 0.3
    assert set(doc["share"]) == set(doc["models"]) and "% of the merged delta" in printed
    assert [p.name for p in out.iterdir()] == ["analysis.json"]


@pytest.mark.parametrize("args,words", [
    (["--models", "{missing}"], ["missing.safetensors"]),
    (["--models", "{m0}", "--k", "0.3"], ["--k", "--method"]),
    (["--models", "{m0}", "--method", "ties", "--k", "1.5"], ["k"]),
    (["--models", "{m0}", "--method", "nope"], ["unknown method"]),
    (["--models", "{junk}"], ["junk.safetensors"]),
])
def test_bad_input_is_one_line_and_exit_2(sd1_set, tmp_path, capsys, args, words):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    names = {"missing": str(tmp_path / "missing.safetensors"), "m0": sd1_set["models"][0], "junk": str(junk)}
    argv = ["analyze", "--base", sd1_set["base"], *[a.format(**names) for a in args],
            "--out", str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    for word in words:
        assert word in err
    assert not (tmp_path / "out" / "analysis.json").exists()


def test_analyze_without_out_names_the_flag(sd1_set, capsys):
    assert main(["analyze", "--base", sd1_set["base"], "--models", sd1_set["models"][0]]) == 2
    assert "--out DIR" in capsys.readouterr().err


def test_merge_prints_each_models_share(sd1_set, tmp_path):
    out = str(tmp_path / "merged.safetensors")
    run = subprocess.run([sys.executable, "-m", "lib_merge", "merge", "--base", sd1_set["base"], "--models",
                          *sd1_set["models"][:2], "--method", "ties", "--k", "0.5", "--out", out, "--quiet"],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stderr
    line = next(x for x in run.stdout.splitlines() if x.startswith("share of the merged delta:"))
    assert "ft1.safetensors" in line and "ft2.safetensors" in line and "%" in line
