"""Hostile files and folders (issue 16): inputs never overwritten, no stray or 0600 files, no SIGBUS.

Every case runs real merges on real safetensors files; the ones that could
kill the interpreter (a truncated input, a killed parent) run in a subprocess.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_merge import CheckpointError, MergeRecipe, OutputError, merge_to_file, merge_to_memory
from lib_merge.checkpoint import open_checkpoint
from lib_merge.errors import ParameterError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET_KEY = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
TE_KEY = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def copy_set(sd1_set, folder) -> tuple[str, str]:
    os.makedirs(folder, exist_ok=True)
    base = shutil.copy(sd1_set["base"], os.path.join(folder, "base.safetensors"))
    model = shutil.copy(sd1_set["models"][0], os.path.join(folder, "ft.safetensors"))
    return base, model


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def run_script(body: str, timeout: int = 300) -> subprocess.CompletedProcess:
    script = f"import sys\nsys.path.insert(0, {ROOT!r})\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))


# ----------------------------------------------------------------------------- 1. never overwrite an input

def test_output_that_is_an_input_is_refused_even_with_overwrite(sd1_set, tmp_path):
    base, model = copy_set(sd1_set, tmp_path / "models")
    before = {p: sha(p) for p in (base, model)}
    os.symlink(tmp_path / "models", tmp_path / "linked")
    os.link(model, tmp_path / "hardlink.safetensors")
    recipe = MergeRecipe("ties", base, [model])
    for out in (base, model, str(tmp_path / "linked" / "ft.safetensors"),
                str(tmp_path / "models" / ".." / "models" / "base.safetensors"),
                str(tmp_path / "hardlink.safetensors")):
        for overwrite in (False, True):
            with pytest.raises(OutputError, match="same file as") as err:
                merge_to_file(recipe, out, overwrite=overwrite, device="cpu")
            assert os.path.basename(out) in str(err.value) and "\n" not in str(err.value)
    assert {p: sha(p) for p in (base, model)} == before
    assert sorted(os.listdir(tmp_path / "models")) == ["base.safetensors", "ft.safetensors"]


def test_output_that_is_the_loaded_checkpoint_is_refused(sd1_set, tmp_path):
    """A WebUI passes the checkpoint it has loaded now as protected."""
    base, model = copy_set(sd1_set, tmp_path)
    loaded = shutil.copy(model, tmp_path / "loaded.safetensors")
    before = sha(loaded)
    with pytest.raises(OutputError, match="same file as"):
        merge_to_file(MergeRecipe("ties", base, [model]), loaded, overwrite=True, device="cpu",
                      protected_paths=[loaded])
    assert sha(loaded) == before


def test_output_that_is_not_a_regular_file_is_refused(sd1_set, tmp_path):
    """``--out /dev/null --overwrite`` must not replace /dev/null.

    The merge is aimed at a symlink to /dev/null (refused: the check follows
    links), never at /dev/null itself, so that running this test against a
    build without the check replaces only the link, not the machine's /dev/null.
    """
    from lib_merge.writer import check_output_target
    with pytest.raises(OutputError, match="/dev/null: is a character device"):
        check_output_target("/dev/null")
    base, model = copy_set(sd1_set, tmp_path / "in")
    recipe = MergeRecipe("ties", base, [model])
    null = tmp_path / "null.safetensors"
    os.symlink("/dev/null", null)
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    for out, kind in ((str(null), "character device"), (str(fifo), "FIFO"), (str(folder), "directory")):
        with pytest.raises(OutputError, match=kind):
            merge_to_file(recipe, out, overwrite=True, device="cpu")
    assert os.path.islink(null) and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and folder.is_dir()
    assert sorted(os.listdir(tmp_path)) == ["folder.safetensors", "in", "null.safetensors", "pipe.safetensors"]


# ----------------------------------------------------------------------------- 2. temporary files

def test_temp_file_carries_the_pid_and_stale_ones_are_removed_in_one_line(sd1_set, tmp_path):
    base, model = copy_set(sd1_set, tmp_path)
    gone = dead_pid()
    stale = tmp_path / f".old.safetensors.dare-merge-{gone}.part"
    stale.write_bytes(b"\0" * 4096)
    live_owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".other.safetensors.dare-merge-{live_owner.pid}.part"
        live.write_bytes(b"\0" * 10)
        unrelated = tmp_path / ".someone-elses.part"
        unrelated.write_bytes(b"x")
        seen, notes = [], []

        def progress(ev):
            seen.extend(n for n in os.listdir(tmp_path) if n.endswith(".part") and n not in seen)

        report = merge_to_file(MergeRecipe("ties", base, [model]), str(tmp_path / "out.safetensors"),
                               device="cpu", progress=progress, notify=notes.append, processes=1)
        assert f".out.safetensors.dare-merge-{os.getpid()}.part" in seen
        assert not stale.exists() and live.exists() and unrelated.exists()
        assert len(notes) == 1 and "\n" not in notes[0] and stale.name in notes[0] and "removed 1 stale" in notes[0]
        assert notes[0] in report.notes and notes[0] in report.summary()
        # nothing stale any more: the next merge says nothing
        notes.clear()
        report = merge_to_file(MergeRecipe("ties", base, [model]), str(tmp_path / "out2.safetensors"),
                               device="cpu", notify=notes.append, processes=1)
        assert notes == [] and not any("stale" in n for n in report.notes)
    finally:
        live_owner.kill()
        live_owner.wait()


def test_killed_merge_leaves_a_temp_file_the_next_merge_removes_and_workers_stay_quiet(sd1_set, tmp_path):
    """SIGKILL of the parent mid-merge: its orphaned workers exit without a BrokenPipe traceback."""
    base, model = copy_set(sd1_set, tmp_path / "in")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = run_script(f"""
        import os, signal
        from lib_merge import MergeRecipe, merge_to_file, parallel
        parallel.MIN_PARALLEL_BYTES = 0
        parallel.GROUP_BYTES = 1 << 14      # many small groups: the worker always has work queued

        def progress(ev):
            if ev.keys_done >= 40:
                os.kill(os.getpid(), signal.SIGKILL)

        merge_to_file(MergeRecipe("ties", {base!r}, [{model!r}]), {str(out_dir / "m.safetensors")!r},
                      device="cpu", processes=2, progress=progress)
    """)
    assert proc.returncode == -9, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    left = os.listdir(out_dir)
    assert len(left) == 1 and left[0].startswith(".m.safetensors.dare-merge-") and left[0].endswith(".part")
    notes = []
    merge_to_file(MergeRecipe("ties", base, [model]), str(out_dir / "n.safetensors"), device="cpu",
                  notify=notes.append)
    assert os.listdir(out_dir) == ["n.safetensors"]
    assert len(notes) == 1 and left[0] in notes[0]


def test_unwritable_output_folder_is_one_line(sd1_set, tmp_path):
    base, model = copy_set(sd1_set, tmp_path / "in")
    if os.geteuid() == 0:   # root writes anywhere a mode allows; sysfs refuses new files even to root
        folder = "/sys"
        if not os.path.isdir(folder):
            pytest.skip("running as root without /sys: no folder root cannot write")
    else:
        folder = str(tmp_path / "ro")
        os.mkdir(folder, 0o555)
    with pytest.raises(OutputError) as err:
        merge_to_file(MergeRecipe("ties", base, [model]), os.path.join(folder, "m.safetensors"), device="cpu")
    message = str(err.value)
    assert "\n" not in message and folder in message and "cannot write in the output folder" in message


# ----------------------------------------------------------------------------- 3. truncated while merging

@pytest.mark.parametrize("processes", [1, 2])
def test_input_truncated_mid_merge_is_one_line_not_sigbus(sd1_set, tmp_path, processes):
    base, model = copy_set(sd1_set, tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    proc = run_script(f"""
        import os
        from lib_merge import MergeRecipe, MergeError, merge_to_file, parallel
        parallel.MIN_PARALLEL_BYTES = 0
        parallel.GROUP_BYTES = 1 << 16
        size = os.path.getsize({model!r})

        def progress(ev):   # as `truncate -s` from another shell would, half way through the keys
            if ev.keys_done >= 5 and os.path.getsize({model!r}) == size:
                os.truncate({model!r}, size // 2)

        try:
            merge_to_file(MergeRecipe("ties", {base!r}, [{model!r}]), {str(out / "m.safetensors")!r},
                          device="cpu", processes={processes}, progress=progress)
            print("MERGED")
        except MergeError as exc:
            print("ERR", exc)
    """)
    assert proc.returncode == 0, f"exit {proc.returncode} (-7 is SIGBUS): {proc.stderr[-2000:]}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERR") and "ft.safetensors" in lines[0], proc.stdout
    assert "changed while it was being read" in lines[0] or "ended early" in lines[0]
    assert os.listdir(out) == []   # no output, no .part


def test_read_of_a_file_truncated_after_opening_names_file_and_key(sd1_set, tmp_path):
    _, model = copy_set(sd1_set, tmp_path)
    with open_checkpoint(model) as ckpt:
        os.truncate(model, os.path.getsize(model) // 2)
        with pytest.raises(CheckpointError, match=r"ft\.safetensors: key .*changed while it was being read"):
            for key in ckpt.keys():
                ckpt.tensor(key)


def test_pickle_checkpoint_truncated_after_opening_is_one_line(tmp_path):
    """.ckpt files are memory-mapped by torch.load: the size is checked before each key is read."""
    path = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": {f"k{i}": torch.randn(64, 1024) for i in range(8)}}, path)
    proc = run_script(f"""
        import os
        from lib_merge.checkpoint import open_checkpoint
        from lib_merge.errors import CheckpointError
        ckpt = open_checkpoint({path!r})
        os.truncate({path!r}, os.path.getsize({path!r}) // 2)
        try:
            for key in ckpt.keys():
                float(ckpt.tensor(key).sum())
            print("READ")
        except CheckpointError as exc:
            print("ERR", exc)
    """)
    assert proc.returncode == 0, f"exit {proc.returncode} (-7 is SIGBUS): {proc.stderr[-2000:]}"
    assert proc.stdout.startswith("ERR") and "model.ckpt: key k0: the file changed" in proc.stdout, proc.stdout


def test_input_rewritten_in_place_to_the_same_size_is_refused(sd1_set, tmp_path):
    """`cp other.safetensors model.safetensors` over an open input: same size, new bytes."""
    _, model = copy_set(sd1_set, tmp_path)
    with open_checkpoint(model) as ckpt:
        first = ckpt.keys()[0]
        ckpt.tensor(first)
        with open(model, "r+b") as f:   # in place, as cp does: same inode, same size
            f.write(open(sd1_set["models"][1], "rb").read())
        os.utime(model, ns=(0, os.stat(model).st_mtime_ns + 10 ** 9))   # coarse clocks: a visibly new mtime
        with pytest.raises(CheckpointError, match=r"ft\.safetensors: key .*written to since it was opened"):
            ckpt.tensor(first)


# ----------------------------------------------------------------------------- 4. file mode

@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_output_gets_the_umask_mode_not_0600(sd1_set, tmp_path, umask):
    base, model = copy_set(sd1_set, tmp_path / "in")
    previous = os.umask(umask)
    try:
        out = tmp_path / "m.safetensors"
        merge_to_file(MergeRecipe("ties", base, [model]), str(out), device="cpu")
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o666 & ~umask == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)


# ----------------------------------------------------------------------------- 5. integer/bool vs float

def test_integer_or_bool_tensor_against_a_float_base_is_not_merged_as_float(sd1_set, tmp_path):
    base_state = load_file(sd1_set["base"])
    state = load_file(sd1_set["models"][0])
    state[UNET_KEY] = torch.randint(-100, 100, state[UNET_KEY].shape, dtype=torch.int8)
    state[TE_KEY] = state[TE_KEY] > 0
    path = str(tmp_path / "quantized.safetensors")
    save_file(state, path)
    for on_mismatch in ("error", "skip"):
        merged, report = merge_to_memory(MergeRecipe("ties", sd1_set["base"], [path], on_mismatch=on_mismatch),
                                         out_dtype="fp16", device="cpu")
        assert torch.equal(merged[UNET_KEY], base_state[UNET_KEY])   # the base's values, not int8 as float
        assert torch.equal(merged[TE_KEY], base_state[TE_KEY])
        lines = [m for m in report.mismatches if "quantized.safetensors" in m]
        assert len(lines) == 1 and "2 keys stored as integer/bool" in lines[0], report.mismatches
    # the other keys of that model are still merged
    assert not torch.equal(merged["model.diffusion_model.out.2.weight"], base_state["model.diffusion_model.out.2.weight"])


def test_float_tensor_where_the_base_has_integers_is_noted(sd1_set, tmp_path):
    state = load_file(sd1_set["models"][0])
    state[POSITION_IDS] = state[POSITION_IDS].to(torch.float16)   # as old fp16 "pruned" models store it
    path = str(tmp_path / "fp16ids.safetensors")
    save_file(state, path)
    merged, report = merge_to_memory(MergeRecipe("ties", sd1_set["base"], [path]), device="cpu")
    assert merged[POSITION_IDS].dtype == torch.int64
    lines = [m for m in report.mismatches if "fp16ids.safetensors" in m]
    assert len(lines) == 1 and "stored as float where the base stores integer/bool" in lines[0]


# ----------------------------------------------------------------------------- 6. header hardening

def write_raw(path, header: bytes | str, data: bytes = b"") -> str:
    header = header.encode() if isinstance(header, str) else header
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        f.write(data)
    return str(path)


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HOSTILE_HEADERS = {
    "deep": ("[" * 200_000 + "]" * 200_000, b"", "not a JSON object"),
    "deep_object": ('{"a":' + "[" * 200_000 + "]" * 200_000 + "}", b"", "nested too deeply"),
    "long_int": ('{"w":{"dtype":"F32","shape":[' + "9" * 5000 + '],"data_offsets":[0,8]}}', b"\0" * 8,
                 "5000-digit integer"),
    "overlap": (json.dumps({"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}), b"\0" * 12,
                "key b: data offsets \\[4, 12\\) overlap those of key a"),
    "gap": (json.dumps({"a": entry(offsets=(0, 8)), "b": entry(offsets=(12, 20))}), b"\0" * 20,
            "key b: .*4 bytes before them that belong to no tensor"),
    "trailing": (json.dumps({"a": entry()}), b"\0" * 16, "8 bytes after the last tensor"),
    "duplicate": ('{"a":' + json.dumps(entry()) + ',"a":' + json.dumps(entry()) + "}", b"\0" * 8,
                  "holds the key 'a' twice"),
    "duplicate_field": ('{"a":{"dtype":"F32","dtype":"I32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8,
                        "holds the key 'dtype' twice"),
    "huge_shape": (json.dumps({"alphas_cumprod": entry(shape=(0, 2 ** 70), offsets=(0, 0))}), b"",
                   "key alphas_cumprod: shape .* is too large"),
    "huge_product": (json.dumps({"a": entry(shape=(2 ** 40, 2 ** 40), offsets=(0, 0))}), b"", "too large"),
    "list_dtype": (json.dumps({"a": entry(dtype=["F32"])}), b"\0" * 8, "key a: unsupported dtype"),
    "bool_shape": (json.dumps({"a": entry(shape=(True, 2))}), b"\0" * 8, "key a: corrupt"),
    "metadata_types": (json.dumps({"__metadata__": {"x": 1}, "a": entry()}), b"\0" * 8, "__metadata__"),
    "not_object": ("[1, 2]", b"", "not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_hostile_header_is_one_line_naming_the_file(tmp_path, case):
    header, data, expected = HOSTILE_HEADERS[case]
    path = write_raw(tmp_path / f"{case}.safetensors", header, data)
    with pytest.raises(CheckpointError, match=expected) as err:
        open_checkpoint(path)
    message = str(err.value)
    assert message.startswith(path) and "\n" not in message and len(message) < 400


def test_huge_shape_outside_unet_is_refused_by_a_merge_too(sd1_set, tmp_path):
    """[0, 2**70] numbers 0 elements, so only the shape check catches it (a key copied from the base)."""
    state = load_file(sd1_set["models"][0])
    path = str(tmp_path / "ok.safetensors")
    save_file(state, path)
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["alphas_cumprod_extra"] = entry(shape=(0, 2 ** 70), offsets=(0, 0))
    bad = write_raw(tmp_path / "bad.safetensors", json.dumps(header), raw[8 + n:])
    with pytest.raises(CheckpointError, match="bad.safetensors: key alphas_cumprod_extra: shape"):
        merge_to_memory(MergeRecipe("ties", bad, [sd1_set["models"][1]]), device="cpu")


def test_valid_files_still_open_after_the_stricter_header_check(sd1_set, tmp_path):
    """safetensors' own writer (metadata, zero-size and odd-sized tensors) passes every new check."""
    path = str(tmp_path / "odd.safetensors")
    tensors = {"a": torch.zeros(3, dtype=torch.float16), "b": torch.zeros(0, 4), "c": torch.arange(5),
               "d": torch.ones(2, dtype=torch.bool), "e": torch.zeros(1, 0)}
    save_file(tensors, path, metadata={"k": "v"})
    with open_checkpoint(path) as ckpt:
        assert ckpt.metadata == {"k": "v"}
        for key, value in tensors.items():
            assert torch.equal(ckpt.tensor(key), value)
    for path in [sd1_set["base"], *sd1_set["models"]]:
        open_checkpoint(path).close()


# ----------------------------------------------------------------------------- 7. empty tensors

def test_zero_element_key_with_trim_merges_to_an_empty_tensor(sd1_set, tmp_path):
    key = "model.diffusion_model.input_blocks.1.1.empty_probe.weight"
    paths = []
    for name, source in (("base", sd1_set["base"]), ("ft", sd1_set["models"][0])):
        state = load_file(source)
        state[key] = torch.zeros(0, 4, dtype=torch.float16)
        paths.append(str(tmp_path / f"{name}.safetensors"))
        save_file(state, paths[-1])
    for method, k in (("ties", 0.5), ("dare_ties", 0.2), ("ties", 1.0)):
        merged, report = merge_to_memory(MergeRecipe(method, paths[0], [paths[1]], k=k), device="cpu")
        assert merged[key].shape == (0, 4)
    out = str(tmp_path / "out.safetensors")
    merge_to_file(MergeRecipe("ties", paths[0], [paths[1]], k=0.3), out, device="cpu", processes=1)
    assert load_file(out)[key].shape == (0, 4)


# ----------------------------------------------------------------------------- 8. weights float32 cannot hold

def test_tiny_weight_is_refused_as_underflow_not_blamed_on_overflow(sd1_set):
    with pytest.raises(ParameterError, match="underflows to 0 in float32") as err:
        merge_to_memory(MergeRecipe("ties", sd1_set["base"], sd1_set["models"][:2], weights=[1e-300, 1]),
                        device="cpu")
    assert "overflow" not in str(err.value) and "ft1.safetensors" in str(err.value)


def test_huge_weights_are_one_line(sd1_set):
    with pytest.raises(ParameterError) as err:
        merge_to_memory(MergeRecipe("ties", sd1_set["base"], sd1_set["models"][:2], weights=[1e308, 1e308]),
                        device="cpu")
    assert "float32" in str(err.value) and "\n" not in str(err.value)


def test_overflow_message_names_the_output_range(sd1_set, tmp_path):
    state = load_file(sd1_set["models"][0])
    state[UNET_KEY] = torch.full_like(state[UNET_KEY], 60000.0)
    path = str(tmp_path / "huge.safetensors")
    save_file(state, path)
    from lib_merge import NonFiniteError
    with pytest.raises(NonFiniteError, match=r"overflow: values beyond the fp16 range ±65504"):
        merge_to_memory(MergeRecipe("add_difference", sd1_set["base"], [path], alpha=2.0), out_dtype="fp16",
                        device="cpu")


# ----------------------------------------------------------------------------- 9. processes

@pytest.mark.parametrize("bad", [0, -1, -8, 1.5, True, "2"])
def test_zero_negative_or_non_integer_processes_are_refused(sd1_set, tmp_path, bad):
    with pytest.raises(ParameterError, match="processes"):
        merge_to_file(MergeRecipe("ties", sd1_set["base"], sd1_set["models"][:1]), str(tmp_path / "m.safetensors"),
                      device="cpu", processes=bad)
    assert os.listdir(tmp_path) == []


def test_processes_are_capped_at_the_core_count(sd1_set, tmp_path, monkeypatch):
    from lib_merge import parallel
    from lib_merge.parallel import check_processes, usable_cores
    cores = usable_cores()
    assert check_processes(cores) == (cores, None)
    capped, note = check_processes(cores + 10)
    assert capped == cores and f"{cores + 10} processes asked for, {cores} used" in note
    started = []
    real_worker = parallel._Worker

    def counting(*args, **kwargs):
        started.append(1)
        return real_worker(*args, **kwargs)

    monkeypatch.setattr(parallel, "_Worker", counting)
    monkeypatch.setattr(parallel, "MIN_PARALLEL_BYTES", 0)
    report = merge_to_file(MergeRecipe("ties", sd1_set["base"], sd1_set["models"][:1]),
                           str(tmp_path / "m.safetensors"), device="cpu", processes=cores + 10)
    assert len(started) == cores - 1   # the parent is the other one
    assert any("processes asked for" in n for n in report.notes)
