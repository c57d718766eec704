"""Hostile command lines: every mistake is one line on stderr and exit 2, never a traceback.

Refusals happen before any merge, so most cases call the CLI's ``main()`` in
this process (no new interpreter per case); inputs are real safetensors files.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lib_merge import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(capsys, *args) -> tuple[int, str, str]:
    try:
        code = cli.main(list(args))
    except SystemExit as exc:   # argparse exits; main() itself returns
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(capsys, *args) -> str:
    code, out, err = run_main(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, out, err)
    return lines[0]


@pytest.fixture()
def merge_args(sd1_set, tmp_path):
    return ["merge", "--base", sd1_set["base"], "--models", *sd1_set["models"][:2], "--quiet",
            "--out", str(tmp_path / "out.safetensors")]


def test_unavailable_cuda_device_is_one_line(capsys, merge_args, tmp_path):
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    line = one_line(capsys, *merge_args, "--device", device)
    assert f"--device {device}" in line and "cpu" in line
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "CUDA"])
def test_unknown_device_is_one_line(capsys, merge_args, device):
    assert device in one_line(capsys, *merge_args, "--device", device)


@pytest.mark.parametrize("flag,label", [("--block-weights", "block weights"), ("--block-p", "block p"),
                                        ("--block-k", "block k")])
def test_non_numeric_block_values_are_one_line_naming_the_value(capsys, merge_args, flag, label):
    values = ",".join(["0.5"] * 25 + ["abc"])
    line = one_line(capsys, *merge_args, flag, values)
    assert label in line and "value 26" in line and "'abc'" in line


def test_block_p_out_of_range_is_refused_before_merging(capsys, merge_args):
    line = one_line(capsys, *merge_args, "--block-p", ",".join(["0.5"] * 25 + ["1.5"]))
    assert "block p: value 26" in line and "p (DARE drop rate) = 1.5" in line


@pytest.mark.parametrize("weights,expected", [(["1e308", "1e308"], "too large"),
                                              (["3e38", "3e38"], "add up to"),
                                              (["inf", "1"], "positive number"),
                                              (["nan", "1"], "positive number")])
def test_overflowing_or_non_finite_weights_are_one_line(capsys, merge_args, tmp_path, weights, expected):
    assert expected in one_line(capsys, *merge_args, "--weights", *weights, "--device", "cpu")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("value", ["0", "-3"])
def test_zero_or_negative_processes_are_refused(capsys, merge_args, value):
    assert f"--processes {value}" in one_line(capsys, *merge_args, "--processes", value)


class _Report:
    def summary(self) -> str:
        return "merged"


def test_processes_above_the_core_count_are_capped_and_said(capsys, merge_args, monkeypatch):
    seen = {}

    def fake_merge(recipe, out, **kwargs):
        seen.update(kwargs)
        return _Report()

    monkeypatch.setattr(cli, "merge_to_file", fake_merge)
    code, out, err = run_main(capsys, *merge_args, "--processes", "1000", "--device", "cpu")
    cores = len(os.sched_getaffinity(0))
    assert code == 0 and seen["processes"] == cores
    assert f"--processes 1000 capped at {cores}" in err


def test_unwritable_output_folder_is_one_line(capsys, sd1_set):
    # /proc refuses new files even for root, where a read-only permission would not
    line = one_line(capsys, "merge", "--base", sd1_set["base"], "--models", sd1_set["models"][0],
                    "--method", "weighted_sum", "--device", "cpu", "--quiet", "--out", "/proc/merged.safetensors")
    assert "/proc" in line


@pytest.mark.parametrize("exc", [PermissionError(13, "Permission denied", "/models/.merged.part"),
                                 OSError(28, "No space left on device", "/models/.merged.part"),
                                 ValueError("something about the input")],
                         ids=["permission", "disk_full", "value_error"])
def test_cli_turns_any_oserror_or_valueerror_into_one_line(capsys, merge_args, monkeypatch, exc):
    """The last resort: whatever the library lets through for bad input is still one line, exit 2."""
    def failing_merge(*args, **kwargs):
        raise exc

    monkeypatch.setattr(cli, "merge_to_file", failing_merge)
    monkeypatch.delenv("DARE_MERGE_DEBUG", raising=False)
    line = one_line(capsys, *merge_args, "--device", "cpu")
    assert (exc.strerror if isinstance(exc, OSError) else str(exc)) in line
    if isinstance(exc, OSError):
        assert "/models/.merged.part" in line


def test_debug_mode_shows_the_traceback_of_an_unexpected_error(capsys, merge_args, monkeypatch):
    def failing_merge(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(cli, "merge_to_file", failing_merge)
    monkeypatch.setenv("DARE_MERGE_DEBUG", "1")
    with pytest.raises(ValueError, match="a bug"):
        cli.main([*merge_args, "--device", "cpu"])


@pytest.mark.parametrize("args", [["merge", "--p", "abc", "--out", "x"], ["merge", "--dtype", "fp8", "--out", "x"],
                                  ["merge", "--base", "b"], ["frobnicate"], ["merge", "--recipe", "r", "--out", "x",
                                                                             "--processes", "many"]],
                         ids=["p_not_a_number", "unknown_dtype", "no_out", "unknown_command", "processes_text"])
def test_usage_mistakes_are_one_line(capsys, args):
    line = one_line(capsys, *args)
    assert "--help" in line


def test_ignore_hash_without_recipe_is_refused(capsys, merge_args):
    assert "--ignore-hash only applies with --recipe" in one_line(capsys, *merge_args, "--ignore-hash")


def test_no_traceback_from_a_real_process_for_an_unavailable_device(sd1_set, tmp_path):
    """The same refusal through ``python -m lib_merge`` (what a user runs), with its exit code."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("DARE_MERGE_DEBUG", None)
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    proc = subprocess.run([sys.executable, "-m", "lib_merge", "merge", "--base", sd1_set["base"], "--models",
                           sd1_set["models"][0], "--device", device, "--out", str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# -- synth: the demo set is small by default; full size is asked for and shows progress

def test_synth_demo_set_defaults_to_the_ui_scaled_down_set(capsys, tmp_path, monkeypatch):
    import inspect

    import lib_merge.synth as synth
    # the standalone UI's --demo calls write_demo_set with its defaults: the same small set
    assert inspect.signature(synth.write_demo_set).parameters["scale_down"].default == synth.DEMO_SCALE_DOWN
    seen = {}

    def fake_demo_set(folder, arch, n_models, scale_down, dtype, progress=None):
        seen.update(folder=folder, scale_down=scale_down)
        return []

    monkeypatch.setattr(synth, "write_demo_set", fake_demo_set)
    code, _, _ = run_main(capsys, "synth", "--demo-set", str(tmp_path / "demo"))
    assert code == 0 and seen["scale_down"] == synth.DEMO_SCALE_DOWN


def test_synth_demo_set_file_is_the_small_one_with_real_keys(tmp_path):
    from lib_merge.checkpoint import open_checkpoint
    from lib_merge.synth import DEMO_SCALE_DOWN, synth_entries
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "lib_merge", "synth", "--demo-set", str(tmp_path), "--n-models", "0"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "demo-sd1-base.safetensors"
    assert proc.stdout.split() == [str(path)] and "dimensions / 8" in proc.stderr
    assert path.stat().st_size < 40e6   # full size is 2.1 GB
    with open_checkpoint(str(path)) as ckpt:
        assert ckpt.arch == "sd1"
    expected = {e["key"]: e["shape"] for e in synth_entries("sd1", DEMO_SCALE_DOWN)}
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert {k: list(f.get_slice(k).get_shape()) for k in f.keys()} == expected


def test_synth_full_size_flag_writes_real_dimensions(capsys, tmp_path, monkeypatch):
    import lib_merge.synth as synth
    seen = {}
    monkeypatch.setattr(synth, "write_synthetic", lambda path, arch, role, seed, base_seed, dtype, scale, progress:
                        seen.update(scale=scale) or path)
    code, _, _ = run_main(capsys, "synth", "--out", str(tmp_path / "x.safetensors"), "--full-size")
    assert code == 0 and seen["scale"] == 1


def test_synth_shows_a_progress_bar_for_big_files(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "SYNTH_BAR_BYTES", 0)   # every file counts as big: a real write, kept small
    out = tmp_path / "small.safetensors"
    code, stdout, err = run_main(capsys, "synth", "--out", str(out), "--scale-down", "32")
    assert code == 0 and out.is_file()
    assert "small.safetensors" in err and "100%" in err
    code, _, err = run_main(capsys, "synth", "--out", str(out), "--scale-down", "32", "--quiet")
    assert code == 0 and "100%" not in err


@pytest.mark.parametrize("args,expected", [(["--scale-down", "0"], "--scale-down 0"),
                                           (["--scale-down", "-2"], "--scale-down -2"),
                                           (["--full-size", "--scale-down", "4"], "not both"),
                                           (["--n-models", "-1"], "--n-models -1")])
def test_synth_bad_sizes_are_one_line(capsys, tmp_path, args, expected):
    assert expected in one_line(capsys, "synth", "--demo-set", str(tmp_path / "d"), *args)
    assert not (tmp_path / "d").exists()
