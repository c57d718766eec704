"""LoRAs in the WebUI without a WebUI: listed beside the checkpoints, resolved, saved by the HTTP API.

``modules.shared`` / ``modules.paths`` / ``modules.sd_models`` are small
stand-ins holding what host.py reads (``--lora-dir``, models_path, the
checkpoint list); the files are real LoRA and checkpoint safetensors.
"""
from __future__ import annotations

import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lib_merge.errors import CheckpointError, OutputError, ParameterError
from lib_merge.webui import api, host

from test_lora import SD1_MODULES, write_lora


class Info:
    def __init__(self, title: str, filename: str) -> None:
        self.title, self.filename, self.name = title, filename, title


@pytest.fixture
def webui(sd1_set, tmp_path, monkeypatch):
    models = tmp_path / "models"
    lora_dir = models / "Lora"
    (lora_dir / "styles").mkdir(parents=True)
    base = Info("base.safetensors [abc]", sd1_set["base"])
    ft = Info("ft1.safetensors [def]", sd1_set["models"][0])
    modules = types.ModuleType("modules")
    shared = types.ModuleType("modules.shared")
    shared.cmd_opts = SimpleNamespace(lora_dir=None, ckpt_dir=None)
    paths = types.ModuleType("modules.paths")
    paths.models_path = str(models)
    sd_models = types.ModuleType("modules.sd_models")
    sd_models.checkpoints_list = {base.title: base, ft.title: ft}
    sd_models.get_closet_checkpoint_match = lambda text: next(
        (i for i in sd_models.checkpoints_list.values() if i.title.startswith(text)), None)
    modules.shared, modules.paths, modules.sd_models = shared, paths, sd_models
    for name, mod in (("modules", modules), ("modules.shared", shared), ("modules.paths", paths),
                      ("modules.sd_models", sd_models)):
        monkeypatch.setitem(sys.modules, name, mod)
    lora = str(lora_dir / "styles" / "ink.safetensors")
    write_lora(lora, load_file(sd1_set["base"]), SD1_MODULES[:3])
    return SimpleNamespace(lora=lora, lora_dir=str(lora_dir), shared=shared, base=base, ft=ft, models=models)


def test_loras_are_listed_after_the_checkpoints_and_marked(webui):
    titles = host.WebUIHost(session=None).list_checkpoints()
    assert titles == ["base.safetensors [abc]", "ft1.safetensors [def]", "LoRA: styles/ink.safetensors"]
    assert host.find_checkpoint("LoRA: styles/ink.safetensors").filename == webui.lora
    assert host.find_checkpoint("LoRA: ink").filename == webui.lora            # short name
    assert host.find_checkpoint(webui.lora).filename == webui.lora             # absolute path
    with pytest.raises(CheckpointError, match="no such LoRA"):
        host.find_checkpoint("LoRA: missing.safetensors")


def test_lora_dir_flag_is_honoured(webui, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    webui.shared.cmd_opts.lora_dir = str(other)
    assert host.lora_dir() == str(other) and host.lora_titles() == []


def test_http_payload_takes_lora_titles_among_models(webui):
    recipe = api.recipe_from_payload({"base": "base.safetensors", "models": ["ft1", "LoRA: styles/ink.safetensors"],
                                      "method": "ties", "weights": [1.0, 0.6]})
    assert recipe.models == [webui.ft.filename, webui.lora]


def test_http_save_lora_writes_into_the_lora_folder(webui, monkeypatch):
    monkeypatch.setattr(host, "loaded_checkpoint_files", lambda loader=None: [])
    target, ranks = api._lora_request({"save_lora": "mine", "lora_rank": 4}, overwrite=False)
    assert target == os.path.join(webui.lora_dir, "mine.safetensors") and ranks == (4, None)
    recipe = api.recipe_from_payload({"base": "base.safetensors", "models": ["LoRA: ink", "ft1"], "method": "ties"})
    saved = api._save_lora(recipe, target, ranks, "cpu", overwrite=False)
    assert saved["title"] == "LoRA: mine.safetensors" and saved["rank"] == 4 and 0 < saved["worst_energy"] <= 1
    assert "LoRA: mine.safetensors" in host.lora_titles()
    with pytest.raises(OutputError, match="exists already"):
        api._lora_request({"save_lora": "mine"}, overwrite=False)
    with pytest.raises(ParameterError, match="lora_rank"):
        api._lora_request({"save_lora": "x", "lora_rank": 0}, overwrite=False)
    with pytest.raises(ParameterError, match="need save_lora"):
        api._lora_request({"lora_rank": 8}, overwrite=False)


def test_xyz_section_lists_loras_and_a_cell_merges_one(webui):
    from lib_merge import merge_to_memory
    from lib_merge.webui import xyz
    assert xyz.checkpoint_titles()[-1] == "LoRA: styles/ink.safetensors"
    values = {"method": "add_difference", "base": "base.safetensors", "models": ["LoRA: styles/ink.safetensors"],
              "p": 0.0, "k": 1.0, "alpha": 1.0, "lam": 1.0, "vote_sgn": False, "seed": 42, "weights": "0.5",
              "split_alpha": False, "alpha_unet": 1.0, "alpha_te": 1.0}
    recipe = xyz.section_recipe(values)
    assert recipe.models == [webui.lora] and recipe.weights == [0.5]
    state, _ = merge_to_memory(recipe, out_dtype="fp32", device="cpu")
    base = load_file(webui.base.filename)
    key = SD1_MODULES[0]["key"]
    assert not torch.equal(state[key], base[key].float())
