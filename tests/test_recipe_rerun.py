"""`merge --recipe FILE` re-runs exactly: stored dtype, explicit overrides, verified inputs, clear refusals.

Every test writes real safetensors files and runs the real CLI in a subprocess.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lib_merge.checkpoint import open_checkpoint
from lib_merge.synth import write_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, check=True):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("DARE_MERGE_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "lib_merge", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def recipe_of(path) -> dict:
    return json.loads(open_checkpoint(str(path)).metadata["dare_merge_recipe"])


def dtypes_of(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys() if "alphas" not in k and "position_ids" not in k
                and "betas" not in k and "posterior" not in k}


@pytest.fixture()
def own_set(sd1_set, tmp_path):
    """Copies of the shared inputs, so a test may replace one without touching the others' files."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    base = shutil.copy(sd1_set["base"], folder / "base.safetensors")
    models = [shutil.copy(m, folder / os.path.basename(m)) for m in sd1_set["models"][:2]]
    return {"base": str(base), "models": [str(m) for m in models]}


@pytest.fixture(scope="module")
def shared_merge(sd1_set, tmp_path_factory):
    """A merge that no test changes (the malformed-recipe cases edit copies of it)."""
    out = tmp_path_factory.mktemp("shared") / "merged.safetensors"
    cli("merge", "--base", sd1_set["base"], "--models", *sd1_set["models"][:2], "--device", "cpu", "--quiet",
        "--out", str(out))
    return out


def main_in_process(capsys, *args) -> tuple[int, str, str]:
    """The CLI's main() in this process: refusals before any merge need no new interpreter."""
    from lib_merge.cli import main
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture()
def bf16_merge(own_set, tmp_path):
    out = tmp_path / "bf16.safetensors"
    cli("merge", "--base", own_set["base"], "--models", *own_set["models"], "--method", "dare_ties",
        "--p", "0.3", "--k", "0.6", "--vote-sgn", "--dtype", "bf16", "--device", "cpu", "--quiet", "--out", str(out))
    return out


def test_recipe_rerun_keeps_the_stored_bf16_dtype_bit_for_bit(bf16_merge, tmp_path):
    again = tmp_path / "again.safetensors"
    cli("merge", "--recipe", str(bf16_merge), "--out", str(again), "--device", "cpu", "--quiet")
    assert recipe_of(again)["output_dtype"] == "bf16"
    assert "BF16" in dtypes_of(again) and "F16" not in dtypes_of(again)
    first, second = load_file(str(bf16_merge)), load_file(str(again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_flags_given_with_recipe_override_it_and_each_change_is_printed(own_set, bf16_merge, tmp_path):
    rerun = tmp_path / "rerun.safetensors"
    proc = cli("merge", "--recipe", str(bf16_merge), "--p", "0.5", "--no-vote-sgn", "--seed", "7",
               "--dtype", "fp32", "--out", str(rerun), "--device", "cpu", "--quiet")
    changed = [line for line in proc.stdout.splitlines() if line.startswith("recipe override:")]
    assert changed == ["recipe override: p: 0.3 -> 0.5", "recipe override: vote_sgn: True -> False",
                       "recipe override: seed: 42 -> 7", "recipe override: output dtype: bf16 -> fp32"]
    doc = recipe_of(rerun)
    assert (doc["method"], doc["p"], doc["k"], doc["vote_sgn"], doc["seed"], doc["output_dtype"]) == \
        ("dare_ties", 0.5, 0.6, False, 7, "fp32")
    # the same merge given in full on the command line gives the same bytes
    direct = tmp_path / "direct.safetensors"
    cli("merge", "--base", own_set["base"], "--models", *own_set["models"], "--method", "dare_ties",
        "--p", "0.5", "--k", "0.6", "--seed", "7", "--dtype", "fp32", "--device", "cpu", "--quiet",
        "--out", str(direct))
    a, b = load_file(str(rerun)), load_file(str(direct))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_recipe_with_other_models_drops_weights_that_no_longer_fit(own_set, tmp_path):
    first = tmp_path / "w.safetensors"
    cli("merge", "--base", own_set["base"], "--models", *own_set["models"], "--weights", "1", "3",
        "--device", "cpu", "--quiet", "--out", str(first))
    again = tmp_path / "w1.safetensors"
    proc = cli("merge", "--recipe", str(first), "--models", own_set["models"][0], "--out", str(again),
               "--device", "cpu", "--quiet")
    assert "recipe override: models: ft1.safetensors, ft2.safetensors -> ft1.safetensors" in proc.stdout
    assert "recipe override: weights: 1, 3 -> 1 each (the number of models changed)" in proc.stdout
    assert recipe_of(again)["weights"] == [1.0]


def test_changed_input_is_refused_by_its_recorded_sha256_unless_ignore_hash(own_set, bf16_merge, tmp_path):
    changed = own_set["models"][1]
    write_synthetic(changed, "sd1", "finetune", seed=99, base_seed=0, scale_down=16)  # same name, other bytes
    out = tmp_path / "refused.safetensors"
    line = one_error_line(cli("merge", "--recipe", str(bf16_merge), "--out", str(out), "--device", "cpu",
                              "--quiet", check=False))
    assert changed in line and "model 2" in line and "--ignore-hash" in line
    assert not out.exists()
    proc = cli("merge", "--recipe", str(bf16_merge), "--out", str(out), "--device", "cpu", "--quiet",
               "--ignore-hash")
    assert "not checked" in proc.stdout and out.exists()


def test_replaced_input_given_explicitly_is_not_checked_against_the_recipe(own_set, bf16_merge, tmp_path):
    other = tmp_path / "other.safetensors"
    write_synthetic(str(other), "sd1", "finetune", seed=98, base_seed=0, scale_down=16)
    out = tmp_path / "explicit.safetensors"
    cli("merge", "--recipe", str(bf16_merge), "--models", own_set["models"][0], str(other), "--out", str(out),
        "--device", "cpu", "--quiet")
    assert [m["file"] for m in recipe_of(out)["models"]] == ["ft1.safetensors", "other.safetensors"]


def _with_recipe_text(src, dst, text: str) -> None:
    tensors = load_file(str(src))
    meta = dict(open_checkpoint(str(src)).metadata)
    meta["dare_merge_recipe"] = text
    save_file(tensors, str(dst), metadata=meta)


def _edited(doc: dict, **changes) -> str:
    doc = json.loads(json.dumps(doc))
    for key, value in changes.items():
        if value is _DROP:
            doc.pop(key)
        else:
            doc[key] = value
    return json.dumps(doc)


_DROP = object()
MALFORMED = {
    "p_is_text": (dict(p="0.3"), "'p' must be a number or null"),
    "seed_is_float": (dict(seed=1.5), "'seed' must be an integer"),
    "vote_sgn_is_number": (dict(vote_sgn=1), "'vote_sgn' must be true/false or null"),
    "models_missing": (dict(models=_DROP), "'models' is missing"),
    "method_missing": (dict(method=_DROP), "'method' is missing"),
    "models_empty": (dict(models=[]), "'models' must be a non-empty list"),
    "base_is_text": (dict(base="base.safetensors"), "base must be an object"),
    "weights_are_text": (dict(weights=["1", "2"]), "weights[0] must be a number"),
    "output_dtype_unknown": (dict(output_dtype="fp8"), "output_dtype must be one of"),
    "block_alpha_is_list": (dict(block_alpha=[1, 2]), "'block_alpha' must be a text or null"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_recipe_metadata_is_one_line_naming_the_file_and_field(shared_merge, tmp_path, capsys, case):
    changes, expected = MALFORMED[case]
    bad = tmp_path / f"bad-{case}.safetensors"
    _with_recipe_text(shared_merge, bad, _edited(recipe_of(shared_merge), **changes))
    out = tmp_path / "o.safetensors"
    code, _, err = main_in_process(capsys, "merge", "--recipe", str(bad), "--out", str(out), "--quiet")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and str(bad) in lines[0] and expected in lines[0], err
    assert not out.exists()


@pytest.mark.parametrize("text,expected", [("{not json", "not valid JSON"), ("[1, 2]", "not a JSON object"),
                                           ("[" * 100_000 + "]" * 100_000, "not valid JSON")],
                         ids=["broken_json", "json_array", "nested_100000_deep"])
def test_recipe_that_is_not_a_json_object_is_one_line(shared_merge, tmp_path, capsys, text, expected):
    bad = tmp_path / "bad.safetensors"
    _with_recipe_text(shared_merge, bad, text)
    code, _, err = main_in_process(capsys, "merge", "--recipe", str(bad), "--out", str(tmp_path / "o.safetensors"),
                                   "--quiet")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and str(bad) in lines[0] and expected in lines[0], err
