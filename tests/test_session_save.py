"""Save from the tab / HTTP session (MergeSession.save): never replaces an input or the loaded checkpoint.

The CLI path is covered by tests/test_hostile_files.py; these drive the
session's Save, which writes an in-memory merge through the same writer.
"""
from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from lib_merge.errors import OutputError
from lib_merge.recipe import MergeRecipe
from lib_merge.session import MergeSession


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture()
def folder(sd1_set, tmp_path):
    """The inputs copied into a checkpoint folder, as a WebUI's models folder holds them."""
    out = {"dir": str(tmp_path)}
    out["base"] = shutil.copy(sd1_set["base"], tmp_path / "base.safetensors")
    out["models"] = [shutil.copy(m, tmp_path / os.path.basename(m)) for m in sd1_set["models"][:2]]
    return out


def _recipe(folder) -> MergeRecipe:
    return MergeRecipe(base=str(folder["base"]), models=[str(m) for m in folder["models"]],
                       method="dare_ties_soup", p=0.5)


@pytest.mark.parametrize("victim", ["base", "model"])
def test_save_with_overwrite_never_replaces_an_input(folder, victim):
    session = MergeSession(folder["dir"], device="cpu")
    session.merge(_recipe(folder), dtype="fp16", hot_load=False)
    target = folder["base"] if victim == "base" else folder["models"][0]
    before = _digest(target)
    with pytest.raises(OutputError, match="input"):
        session.save(os.path.basename(target), dtype="fp16", overwrite=True)
    assert _digest(target) == before
    assert not [n for n in os.listdir(folder["dir"]) if n.endswith(".part")]


def test_save_never_replaces_the_loaded_checkpoint(folder, tmp_path):
    loaded = shutil.copy(folder["base"], tmp_path / "loaded.safetensors")
    session = MergeSession(folder["dir"], device="cpu")
    session.protected_files = lambda: [str(loaded)]
    session.merge(_recipe(folder), dtype="fp16", hot_load=False)
    before = _digest(loaded)
    with pytest.raises(OutputError, match="loaded now"):
        session.save("loaded.safetensors", dtype="fp16", overwrite=True)
    assert _digest(loaded) == before


def test_save_refuses_an_input_name_before_merging(folder):
    session = MergeSession(folder["dir"], device="cpu")
    merged = []
    real = session.merge
    session.merge = lambda *a, **k: merged.append(1) or real(*a, **k)
    with pytest.raises(OutputError):
        session.save(os.path.basename(folder["models"][1]), overwrite=True, recipe=_recipe(folder))
    assert merged == []


def test_save_with_overwrite_still_replaces_an_earlier_save(folder):
    session = MergeSession(folder["dir"], device="cpu")
    session.merge(_recipe(folder), dtype="fp16", hot_load=False)
    path = session.save("mine.safetensors", dtype="fp16")
    os.utime(path, (0, 0))
    assert session.save("mine.safetensors", dtype="bf16", overwrite=True) == path
    assert os.stat(path).st_mtime > 0
