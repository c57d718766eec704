"""Shared fixtures: small synthetic checkpoints with the real SD key names, written once per session."""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True, scope="session")
def _hash_cache(tmp_path_factory):
    """Keep the sha256 cache out of the user's home."""
    os.environ["DARE_MERGE_CACHE"] = str(tmp_path_factory.mktemp("hash-cache"))
    yield


@pytest.fixture(scope="session")
def sd1_set(tmp_path_factory):
    """A tiny SD1 base and three fine-tunes (scale_down 16), fp16, real keys."""
    from lib_merge.synth import write_synthetic
    folder = tmp_path_factory.mktemp("sd1")
    base = str(folder / "base.safetensors")
    write_synthetic(base, "sd1", "base", seed=0, scale_down=16)
    models = []
    for seed in (1, 2, 3):
        path = str(folder / f"ft{seed}.safetensors")
        write_synthetic(path, "sd1", "finetune", seed=seed, base_seed=0, scale_down=16)
        models.append(path)
    return {"dir": str(folder), "base": base, "models": models}


@pytest.fixture(scope="session")
def sdxl_base(tmp_path_factory):
    from lib_merge.synth import write_synthetic
    folder = tmp_path_factory.mktemp("sdxl")
    path = str(folder / "xl_base.safetensors")
    write_synthetic(path, "sdxl", "base", seed=0, scale_down=32)
    return path
