"""Torch-version compatibility: the library only names torch APIs this torch has, and OOM handling works on 2.1.

CI runs this file under the torch versions the WebUIs pin (2.1.2 for A1111 1.10,
2.3.1 for Forge) as well as the current one, so each check below is made
against each of them.
"""
from __future__ import annotations

import ast
import os

import pytest
import torch

from lib_merge import compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [os.path.join(folder, name)
           for base in ("lib_merge", "scripts")
           for folder, _dirs, files in os.walk(os.path.join(ROOT, base))
           for name in files if name.endswith(".py")]


def _torch_chains(tree: ast.AST) -> list[tuple[int, str, bool]]:
    """Every ``torch.a.b`` attribute chain: (line, dotted name, inside an ``except`` clause's type)."""
    in_except: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            in_except.update(id(n) for n in ast.walk(node.type))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        parts, cur = [], node
        while isinstance(cur, ast.Attribute):
            parts.append(cur.attr)
            cur = cur.value
        if isinstance(cur, ast.Name) and cur.id == "torch":
            found.append((node.lineno, "torch." + ".".join(reversed(parts)), id(node) in in_except))
    return found


def _resolves(dotted: str) -> bool:
    obj = torch
    for part in dotted.split(".")[1:]:
        try:
            obj = getattr(obj, part)
        except AttributeError:
            return False
    return True


def test_every_torch_api_named_in_an_except_clause_exists_in_this_torch():
    """``except (torch.OutOfMemoryError, ...)`` is evaluated only when something is raised: on torch < 2.4 the
    handler itself raised AttributeError at the moment a GPU ran out of memory."""
    missing = []
    for path in SOURCES:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for line, dotted, in_except in _torch_chains(tree):
            if in_except and not _resolves(dotted):
                missing.append(f"{os.path.relpath(path, ROOT)}:{line} {dotted}")
    assert not missing, f"torch {torch.__version__} lacks: {missing}"


# APIs newer than torch 2.1.2 (A1111 1.10's pin) that an easy edit could bring in; use lib_merge.compat instead.
NEWER_THAN_2_1 = {"torch.OutOfMemoryError": "2.4", "torch.uint16": "2.3", "torch.uint32": "2.3",
                  "torch.uint64": "2.3", "torch.accelerator": "2.6", "torch.get_default_device": "2.3",
                  "torch.float8_e8m0fnu": "2.7", "torch.xpu.empty_cache": "2.4"}


def test_the_library_names_no_torch_api_newer_than_2_1():
    used = []
    for path in SOURCES:
        if os.path.basename(path) == "compat.py":
            continue   # the one place that looks such names up with getattr and a fallback
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        used += [f"{os.path.relpath(path, ROOT)}:{line} {dotted} (torch {NEWER_THAN_2_1[dotted]}+)"
                 for line, dotted, _ in _torch_chains(tree) if dotted in NEWER_THAN_2_1]
    assert not used, used


def test_out_of_memory_errors_catch_what_torch_raises():
    assert compat.OUT_OF_MEMORY_ERRORS and all(isinstance(c, type) and issubclass(c, BaseException)
                                               for c in compat.OUT_OF_MEMORY_ERRORS)
    with pytest.raises(compat.OUT_OF_MEMORY_ERRORS):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    assert compat.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert compat.is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert compat.is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert compat.is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:83] DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 1 bytes"))
    assert compat.is_out_of_memory(MemoryError())
    assert not compat.is_out_of_memory(RuntimeError("The size of tensor a (3) must match the size of tensor b"))
    assert not compat.is_out_of_memory(ValueError("out of memory"))


def test_device_helpers_keep_the_index_and_do_nothing_without_cuda():
    assert compat.cuda_index("cuda:1") == 1
    assert compat.with_index("cuda:1") == torch.device("cuda", 1)
    assert compat.with_index("cpu") == torch.device("cpu")
    assert compat.mem_get_info("cpu") is None
    assert compat.memory_allocated("cpu") == 0 and compat.memory_reserved("cpu") == 0
    compat.empty_cache("cpu")
    compat.synchronize("cpu")
    if not torch.cuda.is_available():
        assert compat.mem_get_info("cuda:0") is None
        compat.empty_cache("cuda:0")   # no CUDA: nothing to free, and no error
    text = compat.describe_torch()
    assert text.startswith(torch.__version__) and ("CUDA" in text or "CPU" in text or "ROCm" in text)
    assert compat.TORCH_VERSION >= (2, 1)


def test_load_state_dict_pre_hook_on_every_torch():
    """The public hook method is torch 2.5+; the WebUIs' 2.1/2.3 have only the private one."""
    layer = torch.nn.Linear(2, 2)
    seen = []

    def hook(*args, **kwargs):
        seen.append(len(args))
        raise RuntimeError("injected")

    handle = compat.register_load_state_dict_pre_hook(layer, hook)
    with pytest.raises(RuntimeError, match="injected"):
        layer.load_state_dict(torch.nn.Linear(2, 2).state_dict())
    assert seen
    handle.remove()
    layer.load_state_dict(torch.nn.Linear(2, 2).state_dict())
    assert len(seen) == 1
