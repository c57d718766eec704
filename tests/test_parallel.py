"""CPU merges in several processes: the same bytes as one process, errors and cancels leave nothing."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lib_merge import CancelToken, MergeCancelled, MergeRecipe, NonFiniteError, merge_to_file
from lib_merge import parallel
from lib_merge.engine import MergePlan


@pytest.fixture
def many_groups(monkeypatch):
    """Parallel even for tiny test checkpoints, with keys handed out in many small groups."""
    monkeypatch.setattr(parallel, "MIN_PARALLEL_BYTES", 0)
    monkeypatch.setattr(parallel, "GROUP_BYTES", 64 << 10)


def _tensors(path: str) -> dict[str, torch.Tensor]:
    return load_file(path)


def _children() -> set[int]:
    """PIDs of this process's live children (worker processes must not outlive a merge)."""
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as handle:
            pids = {int(p) for p in handle.read().split()}
    except OSError:
        return set()
    return {pid for pid in pids if os.path.exists(f"/proc/{pid}") and
            "lib_merge.parallel" in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")}


@pytest.mark.parametrize("method,extra", [
    ("dare_ties", {"p": 0.4, "k": 0.3}),
    ("dare_ties_soup", {"p": 0.1, "lam": 0.0}),
    ("weighted_sum", {"alpha": 0.6}),
])
def test_processes_write_the_same_bytes_as_one_process(sd1_set, tmp_path, many_groups, method, extra):
    recipe = MergeRecipe(method, sd1_set["base"], sd1_set["models"], **extra)
    one = str(tmp_path / "one.safetensors")
    two = str(tmp_path / "two.safetensors")
    seen = []
    report_one = merge_to_file(recipe, one, device="cpu", processes=1)
    report_two = merge_to_file(recipe, two, device="cpu", processes=2, progress=seen.append)
    a, b = _tensors(one), _tensors(two)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (report_two.merged, report_two.copied) == (report_one.merged, report_one.copied)
    assert seen and seen[-1].keys_done == seen[-1].keys_total == len(MergePlan(recipe).tasks)
    assert seen[-1].bytes_done == seen[-1].bytes_total
    with safe_open(two, "pt") as handle:  # same recipe metadata, same header layout
        with safe_open(one, "pt") as other:
            assert handle.metadata()["dare_merge_recipe"] == other.metadata()["dare_merge_recipe"]
    assert not _children()
    assert sorted(os.listdir(tmp_path)) == ["one.safetensors", "two.safetensors"]


def test_nonfinite_input_in_a_worker_is_reported_with_key_and_file(sd1_set, tmp_path, many_groups):
    tensors = load_file(sd1_set["models"][1])
    plan = MergePlan(MergeRecipe("ties", sd1_set["base"], sd1_set["models"]))
    last_merged = [t.key for t in plan.tasks if t.action == "merge"][-1]  # handed to the worker first
    plan.close()
    tensors[last_merged] = tensors[last_merged].clone()
    tensors[last_merged].view(-1)[3] = float("nan")
    bad = str(tmp_path / "bad_model.safetensors")
    save_file(tensors, bad)
    recipe = MergeRecipe("ties", sd1_set["base"], [sd1_set["models"][0], bad])
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(NonFiniteError) as caught:
        merge_to_file(recipe, out, device="cpu", processes=2)
    assert caught.value.key == last_merged
    assert "bad_model.safetensors" in str(caught.value) and last_merged in str(caught.value)
    assert os.listdir(tmp_path) == ["bad_model.safetensors"]   # no output, no hidden .part file
    assert not _children()


def test_cancel_stops_the_workers_and_leaves_no_file(sd1_set, tmp_path, many_groups):
    recipe = MergeRecipe("dare_ties", sd1_set["base"], sd1_set["models"], p=0.3)
    cancel = CancelToken()
    out = str(tmp_path / "out.safetensors")

    def progress(event):
        if event.keys_done >= 5:
            cancel.cancel()

    with pytest.raises(MergeCancelled):
        merge_to_file(recipe, out, device="cpu", processes=2, progress=progress, cancel=cancel)
    assert os.listdir(tmp_path) == []
    assert not _children()


def test_worker_that_dies_is_an_error_not_a_hang(sd1_set, tmp_path, many_groups, monkeypatch):
    real = parallel._Worker.__init__

    def start_then_kill(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.process.kill()

    monkeypatch.setattr(parallel._Worker, "__init__", start_then_kill)
    recipe = MergeRecipe("dare_ties", sd1_set["base"], sd1_set["models"], p=0.3)
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(Exception) as caught:
        merge_to_file(recipe, out, device="cpu", processes=2)
    assert "worker process exited unexpectedly" in str(caught.value)
    assert os.listdir(tmp_path) == []


def test_cli_uses_processes_and_matches_one_process(sd1_set, tmp_path):
    """End to end through the CLI (real subprocesses, default thresholds lowered by the env)."""
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = []
    for processes in ("1", "2"):
        out = str(tmp_path / f"cli{processes}.safetensors")
        code = ("import sys; from lib_merge import parallel; parallel.MIN_PARALLEL_BYTES = 0; "
                "parallel.GROUP_BYTES = 1 << 16; from lib_merge.cli import main; sys.exit(main(sys.argv[1:]))")
        done = subprocess.run([sys.executable, "-c", code, "merge", "--method", "dare_ties_soup", "--base",
                               sd1_set["base"], "--models", *sd1_set["models"], "--p", "0.2", "--out", out,
                               "--device", "cpu", "--processes", processes],
                              cwd=root, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, PYTHONPATH=root))
        assert done.returncode == 0, done.stderr
        outs.append(load_file(out))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_full_disk_in_the_processes_says_so_and_leaves_nothing(sd1_set, tmp_path):
    """RLIMIT_FSIZE (inherited by the workers) stands in for a full disk."""
    import sys
    import textwrap
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "full.safetensors"
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {root!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))
        from lib_merge import MergeRecipe, merge_to_file, OutputError, parallel
        parallel.MIN_PARALLEL_BYTES = 0
        parallel.GROUP_BYTES = 1 << 16
        try:
            merge_to_file(MergeRecipe("ties", {sd1_set['base']!r}, {sd1_set['models']!r}), {str(out)!r},
                          device="cpu", processes=2)
        except OutputError as exc:
            print("ERR", exc)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "ERR" in proc.stdout and "disk is full" in proc.stdout, proc.stdout + proc.stderr
    assert str(out) in proc.stdout   # names the file the user asked for, not the hidden temporary one
    assert os.listdir(tmp_path) == []
