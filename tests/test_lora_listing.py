"""The Lora folder as the tab, the HTTP API and the X/Y/Z section list it: real files, no WebUI.

lib_merge.lora.listing takes plain values (the WebUI's ``--lora-dir`` and
``models_path``, a folder, titles); lib_merge.webui.host only reads those
settings and calls it.  A LoRA is known by its content, never by its name.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from lib_merge.errors import CheckpointError
from lib_merge.lora.listing import (LORA_MARK, base_choices, find_lora_in, is_lora_file, lora_files_in,
                                    lora_folder_for, resolve_pasted_names)


def _lora(path: str, name: str = "lora_unet_down_blocks_0_attentions_0_proj_in", rank: int = 2) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({f"{name}.lora_down.weight": torch.zeros(rank, 8), f"{name}.lora_up.weight": torch.zeros(8, rank),
               f"{name}.alpha": torch.tensor(1.0)}, path)
    return path


@pytest.fixture()
def lora_folder(tmp_path, sd1_set):
    folder = tmp_path / "Lora"
    _lora(str(folder / "ink.safetensors"))
    _lora(str(folder / "styles" / "watercolor.safetensors"))
    _lora(str(folder / "styles" / "ink-v2.safetensors"), rank=4)
    shutil.copy(sd1_set["base"], folder / "a-checkpoint.safetensors")      # a checkpoint put there by mistake
    (folder / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    _lora(str(folder / ".hidden.safetensors"))
    _lora(str(folder / ".trash" / "old.safetensors"))
    (folder / "notes.txt").write_text("not a model")
    return str(folder)


def test_lora_folder_is_lora_dir_else_models_lora(tmp_path, monkeypatch):
    models = str(tmp_path / "models")
    assert lora_folder_for(None, models) == os.path.join(models, "Lora")
    assert lora_folder_for("", models) == os.path.join(models, "Lora")
    assert lora_folder_for(str(tmp_path / "elsewhere"), models) == str(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path)
    assert lora_folder_for("rel/loras", models) == str(tmp_path / "rel" / "loras")   # made absolute


def test_loras_are_listed_by_content_with_their_marked_titles(lora_folder):
    files = lora_files_in(lora_folder)
    assert [f.title for f in files] == ["LoRA: ink.safetensors", "LoRA: styles/ink-v2.safetensors",
                                        "LoRA: styles/watercolor.safetensors"]
    assert all(f.title == LORA_MARK + f.name for f in files)
    assert files[1].filename == os.path.join(lora_folder, "styles", "ink-v2.safetensors")
    assert not is_lora_file(os.path.join(lora_folder, "a-checkpoint.safetensors"))
    assert not is_lora_file(os.path.join(lora_folder, "broken.safetensors"))
    assert lora_files_in(os.path.join(lora_folder, "missing")) == []


def test_a_file_replaced_in_place_is_looked_at_again(lora_folder, sd1_set):
    ink = os.path.join(lora_folder, "ink.safetensors")
    assert is_lora_file(ink)
    shutil.copy(sd1_set["base"], ink)                 # now a checkpoint under the same name
    assert not is_lora_file(ink)
    assert "LoRA: ink.safetensors" not in [f.title for f in lora_files_in(lora_folder)]


def test_a_title_or_a_pasted_name_finds_the_file(lora_folder):
    files = lora_files_in(lora_folder)
    water = os.path.join(lora_folder, "styles", "watercolor.safetensors")
    assert find_lora_in(files, "LoRA: styles/watercolor.safetensors", lora_folder).filename == water
    assert find_lora_in(files, "styles/watercolor.safetensors", lora_folder).filename == water
    assert find_lora_in(files, "watercolor", lora_folder).filename == water            # a stem, as infotext has it
    assert find_lora_in(files, "ink", lora_folder).title == "LoRA: ink.safetensors"
    with pytest.raises(CheckpointError) as err:
        find_lora_in(files, "LoRA: nothing.safetensors", lora_folder)
    assert lora_folder in str(err.value) and "nothing.safetensors" in str(err.value)
    _lora(os.path.join(lora_folder, "more", "watercolor.safetensors"))
    with pytest.raises(CheckpointError, match="2 LoRAs"):
        find_lora_in(lora_files_in(lora_folder), "watercolor", lora_folder)


def test_loras_are_left_out_of_the_base_list():
    titles = ["base.safetensors [abcd]", "ft.safetensors", "LoRA: ink.safetensors", "LoRA: styles/a.safetensors"]
    assert base_choices(titles) == ["base.safetensors [abcd]", "ft.safetensors"]


def test_a_pasted_infotext_names_loras_among_the_models(lora_folder):
    """The X/Y/Z infotext writes file stems; a LoRA at the top of the Lora folder was not found again."""
    from lib_merge.xyz_axes import resolve_names
    titles = ["ft1.safetensors [aaaa]", "sub/ft2.safetensors"] + [f.title for f in lora_files_in(lora_folder)]
    names = ["ft1", "ink", "watercolor", "ft2", "gone"]
    assert resolve_pasted_names(names, titles) == ["ft1.safetensors [aaaa]", "LoRA: ink.safetensors",
                                                   "LoRA: styles/watercolor.safetensors", "sub/ft2.safetensors",
                                                   None]
    assert resolve_names(["ink"], titles) == [None]   # the plain resolver alone misses it


def test_standalone_folder_lists_loras_marked_and_resolves_them(tmp_path, sd1_set):
    from lib_merge.ui.host import FolderHost
    shutil.copy(sd1_set["base"], tmp_path / "base.safetensors")
    _lora(str(tmp_path / "ink.safetensors"))
    host = FolderHost(str(tmp_path), device="cpu")
    assert host.list_checkpoints() == ["base.safetensors", "LoRA: ink.safetensors"]
    assert base_choices(host.list_checkpoints()) == ["base.safetensors"]
    assert host.resolve("LoRA: ink.safetensors") == str(tmp_path / "ink.safetensors")


def test_the_listing_reads_names_only_and_agrees_with_the_merge(lora_folder, sd1_set, tmp_path):
    """The folder listing decides from the header's names (a validated open took 60 ms per SDXL LoRA); it gives
    the answer the merge's own check gives, for kohya and PEFT LoRAs and for a checkpoint."""
    from lib_merge.checkpoint import open_checkpoint
    from lib_merge.lora.formats import keys_look_like_lora, looks_like_lora
    peft = str(tmp_path / "peft.safetensors")
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 8),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 2)}, peft)
    files = [os.path.join(lora_folder, "ink.safetensors"), peft, sd1_set["base"]]
    for path in files:
        with open_checkpoint(path) as ckpt:
            assert keys_look_like_lora(ckpt.keys()) == looks_like_lora(ckpt) == is_lora_file(path), path
    assert [is_lora_file(p) for p in files] == [True, True, False]
