"""The tab's Save refuses a name the file system would refuse before it merges (same rule as the HTTP route).

Calls the real Save handler of the real gradio Blocks, with the inputs wired to it.
"""
from __future__ import annotations

import os

import pytest


def _save_handler(tab):
    for index, fn in enumerate(tab.fns):
        if getattr(fn.fn, "__name__", None) == "on_save":
            return fn.fn, [tab.blocks[i] for i in tab.dependencies[index]["inputs"]]
    raise AssertionError("the tab has no Save handler")


def _run_save(host, files, name):
    from lib_merge.ui.tab import build_tab
    handler, inputs = _save_handler(build_tab(host))
    values = []
    for block in inputs:
        elem = block.elem_id
        if elem == "dare_merge_base":
            values.append(files["base"])
        elif elem == "dare_merge_models":
            values.append([files["ft1"], files["ft2"]])
        elif elem == "dare_merge_save_name":
            values.append(name)
        elif elem == "dare_merge_device":
            values.append("cpu")
        else:
            values.append(block.value)
    return [row[0] for row in handler(*values)]


def test_tab_refuses_a_too_long_name_before_merging(ui_checkpoints):
    pytest.importorskip("gradio")
    from lib_merge.ui.host import FolderHost
    host = FolderHost(ui_checkpoints["dir"], device="cpu")
    before = sorted(os.listdir(ui_checkpoints["dir"]))
    for name, expected in (("a" * 300, "too long: 312 bytes"), ("あ" * 75, "too long: 237 bytes"),
                           ("nul.txt", "reserved device name")):
        texts = _run_save(host, ui_checkpoints["files"], name)
        assert len(texts) == 1 and texts[0].startswith("error: ") and expected in texts[0], texts
        assert "\n" not in texts[0] and "Traceback" not in texts[0]
    assert host.session.merges_performed == 0, "the tab merged before refusing the name"
    assert sorted(os.listdir(ui_checkpoints["dir"])) == before
    # the same call with a good name merges and saves: the refusals above were about the name only
    texts = _run_save(host, ui_checkpoints["files"], "tab-name-ok")
    assert texts[-1].startswith("saved ") and host.session.merges_performed == 1, texts
    os.remove(os.path.join(ui_checkpoints["dir"], "tab-name-ok.safetensors"))
