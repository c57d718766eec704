"""`python -m lib_merge` end to end on real files written by the tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from lib_merge.checkpoint import open_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, check=True):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "lib_merge", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


def test_merge_inspect_and_recipe_rerun_are_bit_identical(sd1_set, tmp_path):
    out = str(tmp_path / "merged.safetensors")
    proc = cli("merge", "--base", sd1_set["base"], "--models", *sd1_set["models"], "--method", "dare_ties",
               "--p", "0.3", "--k", "0.5", "--alpha", "0.8", "--vote-sgn", "--lambda", "0.5", "--seed", "7",
               "--weights", "1", "2", "0.5", "--dtype", "bf16", "--device", "cpu", "--out", out)
    assert "keys merged" in proc.stdout
    meta = open_checkpoint(out).metadata
    doc = json.loads(meta["dare_merge_recipe"])
    assert (doc["method"], doc["p"], doc["k"], doc["alpha"], doc["vote_sgn"], doc["lam"], doc["seed"]) == \
        ("dare_ties", 0.3, 0.5, 0.8, True, 0.5, 7)
    assert doc["weights"] == [1.0, 2.0, 0.5] and doc["output_dtype"] == "bf16"
    assert [m["file"] for m in doc["models"]] == ["ft1.safetensors", "ft2.safetensors", "ft3.safetensors"]
    assert all(len(m["hash"]) == 10 for m in doc["models"])
    a1111 = json.loads(meta["sd_merge_recipe"])
    assert a1111["method"] == "dare_ties" and len(json.loads(meta["sd_merge_models"])) == 4

    again = str(tmp_path / "again.safetensors")
    cli("merge", "--recipe", out, "--out", again, "--dtype", "bf16", "--device", "cpu", "--quiet")
    first, second = load_file(out), load_file(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)

    shown = cli("inspect", out).stdout
    assert "SD1.x" in shown and "dare_ties" in shown and "ft2.safetensors" in shown
    as_json = json.loads(cli("inspect", "--json", out).stdout)
    assert as_json["architecture"] == "SD1.x" and as_json["components"]["unet"]["keys"] == 686


def test_errors_are_one_line_naming_the_file_with_nonzero_exit(sd1_set, tmp_path):
    out = str(tmp_path / "o.safetensors")
    missing = str(tmp_path / "missing.safetensors")
    proc = cli("merge", "--base", sd1_set["base"], "--models", missing, "--out", out, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.safetensors" in lines[0] and "Traceback" not in proc.stderr
    proc = cli("merge", "--base", sd1_set["base"], "--models", sd1_set["models"][0], "--p", "1.0", "--out", out,
               check=False)
    assert proc.returncode == 2 and "p (DARE drop rate) = 1" in proc.stderr
    assert not os.path.exists(out)


def test_existing_output_needs_overwrite(sd1_set, tmp_path):
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep me")
    args = ["merge", "--base", sd1_set["base"], "--models", sd1_set["models"][0], "--method", "weighted_sum",
            "--out", str(out), "--quiet", "--device", "cpu"]
    proc = cli(*args, check=False)
    assert proc.returncode == 2 and "exists already" in proc.stderr and out.read_bytes() == b"keep me"
    cli(*args, "--overwrite")
    assert len(load_file(str(out))) > 1000


def test_block_weights_flag(sd1_set, tmp_path):
    out = str(tmp_path / "bw.safetensors")
    cli("merge", "--base", sd1_set["base"], "--models", *sd1_set["models"][:2], "--method", "ties_soup",
        "--block-weights", ",".join(["0"] * 26), "--out", out, "--quiet", "--device", "cpu", "--dtype", "fp16")
    merged, base = load_file(out), load_file(sd1_set["base"])
    key = "model.diffusion_model.middle_block.1.proj_in.weight"
    assert torch.equal(merged[key], base[key])
    proc = cli("merge", "--base", sd1_set["base"], "--models", sd1_set["models"][0], "--block-weights", "1,1",
               "--out", str(tmp_path / "x.safetensors"), check=False)
    assert proc.returncode == 2 and "26 values" in proc.stderr


def test_synth_demo_set(tmp_path):
    proc = cli("synth", "--demo-set", str(tmp_path / "demo"), "--n-models", "1", "--scale-down", "16")
    paths = proc.stdout.split()
    assert len(paths) == 2 and all(os.path.exists(p) for p in paths)
    assert open_checkpoint(paths[0]).arch == "sd1"


def test_interrupt_just_after_the_temp_file_is_created_leaves_no_file(sd1_set, tmp_path, monkeypatch):
    """SIGTERM/Ctrl-C between the temp file's creation and its writer owning it (seen once under load in CI)."""
    from lib_merge import cli, writer
    real_create = writer._create_temp

    def create_then_interrupt(folder, name):
        real_create(folder, name)
        raise KeyboardInterrupt   # what cli._terminate raises on SIGTERM, at the worst moment

    monkeypatch.setattr(writer, "_create_temp", create_then_interrupt)
    out = tmp_path / "out"
    out.mkdir()
    code = cli.main(["merge", "--base", sd1_set["base"], "--models", *sd1_set["models"], "--method", "ties",
                     "--out", str(out / "m.safetensors"), "--device", "cpu", "--processes", "1", "--quiet"])
    assert code == 130
    assert list(out.iterdir()) == []


def test_sigterm_mid_merge_leaves_no_file(sd1_set, tmp_path):
    import signal
    import time
    out = tmp_path / "killed.safetensors"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "lib_merge", "merge", "--base", sd1_set["base"], "--models",
                             *sd1_set["models"], "--method", "dare_ties", "--k", "0.3", "--out", str(out),
                             "--device", "cpu"], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.endswith(".part") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "cancelled" in err
    assert list(tmp_path.iterdir()) == []
