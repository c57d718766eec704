"""The tab's "Save as LoRA": the real handler of the real gradio Blocks writes a LoRA the merger reads back."""
from __future__ import annotations

import os

import pytest


def _handler(tab, name):
    for index, fn in enumerate(tab.fns):
        if getattr(fn.fn, "__name__", None) == name:
            return fn.fn, [tab.blocks[i] for i in tab.dependencies[index]["inputs"]]
    raise AssertionError(f"the tab has no {name} handler")


def _run(host, files, name, rank):
    from lib_merge.ui.tab import build_tab
    handler, inputs = _handler(build_tab(host), "on_save_lora")
    values = []
    for block in inputs:
        elem = block.elem_id
        if elem == "dare_merge_base":
            values.append(files["base"])
        elif elem == "dare_merge_models":
            values.append([files["ft1"], files["ft2"]])
        elif elem == "dare_merge_save_name":
            values.append(name)
        elif elem == "dare_merge_lora_rank":
            values.append(rank)
        elif elem == "dare_merge_device":
            values.append("cpu")
        else:
            values.append(block.value)
    return [row[0] for row in handler(*values)]


def test_save_as_lora_writes_a_lora_that_is_listed_and_merges(ui_checkpoints):
    pytest.importorskip("gradio")
    from lib_merge import MergeRecipe, merge_to_memory
    from lib_merge.lora.formats import looks_like_lora
    from lib_merge.checkpoint import open_checkpoint
    from lib_merge.ui.host import FolderHost
    host = FolderHost(ui_checkpoints["dir"], device="cpu")
    texts = _run(host, ui_checkpoints["files"], "tab-lora", 0)
    assert len(texts) == 1 and texts[0].startswith("error: ") and "rank" in texts[0], texts
    texts = _run(host, ui_checkpoints["files"], "tab-lora", 8)
    assert texts[-1].startswith("wrote LoRA ") and "worst" in texts[-1], texts
    path = os.path.join(ui_checkpoints["dir"], "tab-lora.safetensors")
    try:
        with open_checkpoint(path) as ckpt:
            assert looks_like_lora(ckpt) and ckpt.metadata["ss_network_dim"] == "8"
        assert "LoRA: tab-lora.safetensors" in host.list_checkpoints()  # listed, marked, for the next merge
        assert host.resolve("LoRA: tab-lora.safetensors") == path
        base = os.path.join(ui_checkpoints["dir"], ui_checkpoints["files"]["base"])
        state, _ = merge_to_memory(MergeRecipe("add_difference", base, [path], p=0.0), device="cpu")
        assert state
    finally:
        os.remove(path)


def test_the_base_list_leaves_loras_out_and_the_model_list_keeps_them(ui_checkpoints, tmp_path):
    """A LoRA cannot be a base: the tab's base dropdown does not offer one, the models dropdown does."""
    pytest.importorskip("gradio")
    import shutil

    import torch
    from safetensors.torch import save_file

    from lib_merge.ui.host import FolderHost
    from lib_merge.ui.tab import build_tab
    shutil.copy(os.path.join(ui_checkpoints["dir"], ui_checkpoints["files"]["base"]), tmp_path / "base.safetensors")
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{name}.lora_down.weight": torch.zeros(2, 8), f"{name}.lora_up.weight": torch.zeros(8, 2)},
              str(tmp_path / "ink.safetensors"))
    tab = build_tab(FolderHost(str(tmp_path), device="cpu"))

    def choices(elem_id):
        block = next(b for b in tab.blocks.values() if getattr(b, "elem_id", None) == elem_id)
        return [c[0] if isinstance(c, (tuple, list)) else c for c in block.choices]

    assert choices("dare_merge_base") == ["base.safetensors"]
    assert choices("dare_merge_models") == ["base.safetensors", "LoRA: ink.safetensors"]
