"""Hostile inputs and failures: a clear message naming the file/key, and nothing lost."""
from __future__ import annotations

import json
import math
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_merge import (ArchitectureError, CheckpointError, MergeRecipe, NonFiniteError, OutputError,
                       merge_to_file, merge_to_memory)
from lib_merge.checkpoint import open_checkpoint
from lib_merge.writer import check_output_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET_KEY = "model.diffusion_model.input_blocks.1.1.proj_in.weight"


def write_raw(path, header: bytes, data: bytes = b"", length: int | None = None):
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header) if length is None else length))
        f.write(header)
        f.write(data)
    return str(path)


def test_corrupt_safetensors_are_refused_naming_the_file(tmp_path):
    good_header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    cases = {
        "header_past_end.safetensors": write_raw(tmp_path / "header_past_end.safetensors", b"{}", length=1 << 40),
        "bad_json.safetensors": write_raw(tmp_path / "bad_json.safetensors", b"{not json"),
        "offsets.safetensors": write_raw(tmp_path / "offsets.safetensors", good_header, b"\0" * 4),
        "empty.safetensors": str(tmp_path / "empty.safetensors"),
        "text.safetensors": str(tmp_path / "text.safetensors"),
    }
    open(cases["empty.safetensors"], "wb").close()
    with open(cases["text.safetensors"], "w") as f:
        f.write("this is a readme, not a model\n" * 10)
    for name, path in cases.items():
        with pytest.raises(CheckpointError) as err:
            open_checkpoint(path)
        assert name in str(err.value)
    with pytest.raises(CheckpointError, match="key w"):
        open_checkpoint(cases["offsets.safetensors"])


def test_directory_and_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="directory"):
        open_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(str(tmp_path / "nope.safetensors"))


def test_non_sd_safetensors_is_refused_as_not_a_checkpoint(sd1_set, tmp_path):
    path = str(tmp_path / "lora.safetensors")
    save_file({"lora_unet_down.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(ArchitectureError, match="lora.safetensors.*not a Stable Diffusion"):
        merge_to_memory(MergeRecipe("ties", sd1_set["base"], [path]), device="cpu")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": _Exploit(str(marker))}}, f)
    with pytest.raises(CheckpointError, match="evil.ckpt.*refused"):
        open_checkpoint(str(path))
    assert not marker.exists()
    # the payload is real: a plain pickle.load (in a throwaway process) does create the marker
    probe = tmp_path / "probe.ckpt"
    probe_marker = tmp_path / "probe_ran"
    with open(probe, "wb") as f:
        pickle.dump(_Exploit(str(probe_marker)), f)
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(probe)!r}, 'rb'))"], check=True)
    assert probe_marker.exists()
    # the same payload inside torch's zip format
    zpath = tmp_path / "evil_zip.pt"
    torch.save({"state_dict": {"x": _Exploit(str(marker))}}, str(zpath))
    with pytest.raises(CheckpointError, match="refused"):
        open_checkpoint(str(zpath))
    assert not marker.exists()


def test_tensor_only_ckpt_loads_and_merges(sd1_set, tmp_path):
    state = load_file(sd1_set["models"][0])
    path = str(tmp_path / "ft.ckpt")
    torch.save({"state_dict": state, "global_step": 10}, path)
    merged_ckpt, _ = merge_to_memory(MergeRecipe("ties", sd1_set["base"], [path]), device="cpu")
    merged_st, _ = merge_to_memory(MergeRecipe("ties", sd1_set["base"], sd1_set["models"][:1]), device="cpu")
    assert torch.equal(merged_ckpt[UNET_KEY], merged_st[UNET_KEY])


def test_nan_in_an_input_is_reported_by_key_and_file_and_nothing_saved(sd1_set, tmp_path):
    state = load_file(sd1_set["models"][1])
    state[UNET_KEY] = state[UNET_KEY].clone()
    state[UNET_KEY].view(-1)[3] = float("nan")
    path = str(tmp_path / "nan.safetensors")
    save_file(state, path)
    out = tmp_path / "out.safetensors"
    for method in ("ties_soup", "add_difference", "weighted_sum"):
        with pytest.raises(NonFiniteError) as err:
            merge_to_file(MergeRecipe(method, sd1_set["base"], [sd1_set["models"][0], path]), str(out), device="cpu")
        assert UNET_KEY in str(err.value) and "nan.safetensors" in str(err.value), method
        assert not out.exists()
    report = merge_to_file(MergeRecipe("ties_soup", sd1_set["base"], [path], allow_nonfinite=True), str(out),
                           device="cpu")
    assert any(UNET_KEY in line for line in report.nonfinite)


def test_overflow_produced_by_the_merge_is_refused(sd1_set, tmp_path):
    state = load_file(sd1_set["models"][0])
    state[UNET_KEY] = torch.full_like(state[UNET_KEY], 60000.0)
    path = str(tmp_path / "huge.safetensors")
    save_file(state, path)
    with pytest.raises(NonFiniteError, match="produced NaN/Inf"):
        merge_to_memory(MergeRecipe("add_difference", sd1_set["base"], [path], alpha=2.0), out_dtype="fp16",
                        device="cpu")


@pytest.mark.parametrize("name", ["a/b", "..", "../x", "/abs/path", ".hidden", "con", "", "x\\y", "a:b"])
def test_bad_output_names_are_refused(name):
    with pytest.raises(OutputError):
        check_output_name(name)


def test_good_output_name_gets_the_suffix():
    assert check_output_name("my merge v2") == "my merge v2.safetensors"
    assert check_output_name("x.safetensors") == "x.safetensors"


def test_disk_full_mid_write_leaves_no_file(sd1_set, tmp_path):
    """A file-size limit makes the write fail half way, as a full disk would."""
    out = tmp_path / "full.safetensors"
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {ROOT!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))
        from lib_merge import MergeRecipe, merge_to_file, OutputError
        try:
            merge_to_file(MergeRecipe("ties", {sd1_set['base']!r}, {sd1_set['models']!r}), {str(out)!r}, device="cpu")
        except OutputError as exc:
            print("ERR", exc)
    """)
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "ERR" in proc.stdout and "disk is full" in proc.stdout, proc.stdout + proc.stderr
    assert os.listdir(tmp_path) == []


def test_hash_of_inputs_in_metadata_matches_sha256(sd1_set, tmp_path):
    import hashlib
    out = str(tmp_path / "m.safetensors")
    merge_to_file(MergeRecipe("ties", sd1_set["base"], sd1_set["models"][:1]), out, device="cpu")
    doc = json.loads(open_checkpoint(out).metadata["dare_merge_recipe"])
    with open(sd1_set["base"], "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    assert doc["base"]["sha256"] == sha and doc["base"]["hash"] == sha[:10]
    assert math.isfinite(doc["p"])


def test_write_behind_flushes_during_the_merge_and_stops_on_commit_and_abort(sd1_set, tmp_path, monkeypatch):
    """The early flush (on for outputs >= 256 MB) is forced on here: same bytes, no thread or file left."""
    from lib_merge import writer

    recipe = MergeRecipe("dare_ties", sd1_set["base"], sd1_set["models"])
    plain = str(tmp_path / "plain.safetensors")
    merge_to_file(recipe, plain, device="cpu")

    syncs = []
    real_sync = getattr(os, "fdatasync", os.fsync)
    monkeypatch.setattr(writer, "WRITE_BEHIND_BYTES", 0)
    monkeypatch.setattr(writer, "WRITE_BEHIND_SECONDS", 0.001)
    monkeypatch.setattr(os, "fdatasync" if hasattr(os, "fdatasync") else "fsync",
                        lambda fd: (syncs.append(fd), real_sync(fd))[1])
    flushed = str(tmp_path / "flushed.safetensors")
    merge_to_file(recipe, flushed, device="cpu")
    with open(plain, "rb") as a, open(flushed, "rb") as b:
        assert a.read() == b.read()
    assert syncs, "the write-behind thread never flushed"
    assert not [t for t in threading.enumerate() if t.name == "dare-merge-write-behind"]

    entries = [("a", (1024,), torch.float32)]
    broken = writer.SafetensorsWriter(str(tmp_path / "aborted.safetensors"), entries)
    broken.abort()
    assert not [t for t in threading.enumerate() if t.name == "dare-merge-write-behind"]
    assert sorted(os.listdir(tmp_path)) == ["flushed.safetensors", "plain.safetensors"]
