"""Synthetic checkpoints with the real SD1/SD2/SDXL keys, shapes and dtypes.

No model weights can be downloaded where this project is tested, yet the
engine, the tab and the WebUI hot-load must all see real key names.  A "base"
is seeded noise at a plausible scale per tensor; a "finetune" is the base plus
a small dense delta and a sparse set of larger changes (the shape of real
fine-tune deltas that TIES/DARE are designed around).  Same arguments, same
bytes.  ``scale_down`` divides every dimension above 64 for tiny test files.
"""
from __future__ import annotations

import hashlib
import math
import os
from typing import Callable, Sequence

import torch

from .arch import reference_keys
from .writer import OUTPUT_TORCH_DTYPES, SafetensorsWriter

_SCHEDULE_KEYS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                  "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                  "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                  "posterior_mean_coef1", "posterior_mean_coef2"}
_FIXED_DTYPE_COMPONENTS = ("scheduler", "ema")
_JSON_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "int32": torch.int32}


def _seed(*parts: object) -> int:
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def synth_entries(arch: str, scale_down: int = 1, drop_optional: bool = False) -> list[dict]:
    out = []
    for entry in reference_keys(arch):
        if drop_optional and entry["optional"]:
            continue
        shape = [d if d <= 64 or scale_down <= 1 else max(1, d // scale_down) for d in entry["shape"]]
        out.append({**entry, "shape": shape})
    return out


def ldm_schedule(n: int, linear_start: float = 0.00085, linear_end: float = 0.012) -> dict[str, torch.Tensor]:
    """The DDPM buffers LDM stores in SD1/SD2 checkpoints ("linear" schedule), in float64.

    A WebUI samples with ``alphas_cumprod`` from the file, so these must be
    the real values even in a synthetic checkpoint.
    """
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(), "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(), "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp_min(1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }


def _base_value(key: str, shape: Sequence[int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    if key in _SCHEDULE_KEYS:
        return ldm_schedule(shape[0])[key].to(dtype).reshape(shape)
    if key.startswith("model_ema.") or key.endswith("logit_scale"):
        value = 0.9999 if key == "model_ema.decay" else math.log(100.0)
        return torch.full(shape, value, dtype=dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
    if not dtype.is_floating_point:
        n = math.prod(shape)
        return torch.arange(n, dtype=dtype).reshape(shape) if key.endswith("position_ids") \
            else torch.zeros(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(_seed(seed, "base", key))
    t = torch.empty(shape, dtype=torch.float32)
    if len(shape) <= 1 and key.endswith("weight"):
        return t.normal_(1.0, 0.05, generator=gen)      # norm scales
    if key.endswith("bias") or len(shape) <= 1:
        return t.normal_(0.0, 0.01, generator=gen)
    fan_in = max(1, math.prod(shape[1:]))
    return t.normal_(0.0, min(0.05, max(0.01, fan_in ** -0.5)), generator=gen)


def _finetune_value(key: str, base: torch.Tensor, seed: int, delta_scale: float,
                    sparse_frac: float, sparse_mult: float) -> torch.Tensor:
    if not base.is_floating_point() or base.numel() == 0:
        return base
    x = base.float()
    std = float(x.std()) if x.numel() > 1 else abs(float(x.reshape(-1)[0])) * 0.05 or 1e-3
    gen = torch.Generator().manual_seed(_seed(seed, "delta", key))
    dstd = delta_scale * (std or 1e-3)
    out = torch.empty_like(x).normal_(0.0, dstd, generator=gen).add_(x)
    if sparse_frac > 0:
        picks = torch.rand(x.shape, generator=gen) < sparse_frac
        out[picks] += torch.empty(int(picks.sum()), dtype=torch.float32).normal_(0.0, dstd * sparse_mult,
                                                                                 generator=gen)
    return out


# What `synth --demo-set` and the standalone UI's --demo write by default: every dimension above 64
# divided by 8, about 34 MB per SD1 file (full size is 2.1 GB each).
DEMO_SCALE_DOWN = 8

# progress(path, bytes written so far, bytes in the file)
SynthProgress = Callable[[str, int, int], None]


def _out_entries(arch: str, dtype: str, scale_down: int, drop_optional: bool) -> tuple[list[dict], list[tuple]]:
    float_dtype = OUTPUT_TORCH_DTYPES[dtype]
    entries = synth_entries(arch, scale_down, drop_optional)
    out_entries = []
    for e in entries:
        src = _JSON_DTYPES[e["dtype"]]
        keep = not src.is_floating_point or e["component"] in _FIXED_DTYPE_COMPONENTS
        out_entries.append((e["key"], tuple(e["shape"]), src if keep else float_dtype))
    return entries, out_entries


def synthetic_nbytes(arch: str = "sd1", dtype: str = "fp16", scale_down: int = 1, drop_optional: bool = False) -> int:
    """Tensor bytes of one synthetic checkpoint (the file is this plus a small header)."""
    _, out_entries = _out_entries(arch, dtype, scale_down, drop_optional)
    return sum(math.prod(shape) * out_dtype.itemsize for _, shape, out_dtype in out_entries)


def write_synthetic(path: str, arch: str = "sd1", role: str = "base", seed: int = 0, base_seed: int = 0,
                    dtype: str = "fp16", scale_down: int = 1, drop_optional: bool = False,
                    delta_scale: float = 0.01, sparse_frac: float = 0.02, sparse_mult: float = 10.0,
                    frozen: Sequence[str] = (), overwrite: bool = True, progress: SynthProgress | None = None) -> str:
    """Write one synthetic checkpoint; a finetune regenerates its base from ``base_seed``.

    ``progress`` is told the bytes written after each tensor: a full-size
    SD1 file is 2 GB and takes a while, and silence looks like a hang.
    """
    float_dtype = OUTPUT_TORCH_DTYPES[dtype]
    entries, out_entries = _out_entries(arch, dtype, scale_down, drop_optional)
    total = sum(math.prod(shape) * out_dtype.itemsize for _, shape, out_dtype in out_entries)
    done = 0
    with SafetensorsWriter(path, out_entries, overwrite=overwrite, metadata_reserve=1024) as writer:
        for e, (key, shape, out_dtype) in zip(entries, out_entries):
            src = _JSON_DTYPES[e["dtype"]]
            value = _base_value(key, shape, src, base_seed if role == "finetune" else seed)
            if role == "finetune" and value.is_floating_point() and e["component"] not in frozen \
                    and e["component"] not in _FIXED_DTYPE_COMPONENTS and not key.endswith("logit_scale"):
                value = _finetune_value(key, value.to(float_dtype), seed, delta_scale, sparse_frac, sparse_mult)
            writer.write(key, value.to(out_dtype))
            if progress is not None:
                done += math.prod(shape) * out_dtype.itemsize
                progress(path, done, total)
        writer.commit({"format": "pt", "synthetic": f"{arch} {role} seed={seed} base_seed={base_seed} "
                                                    f"scale_down={scale_down}"})
    return os.path.abspath(path)


def demo_set_paths(folder: str, arch: str = "sd1", n_models: int = 3) -> list[tuple[str, str, int]]:
    """(path, role, seed) of the files :func:`write_demo_set` writes: a base, then n fine-tunes."""
    specs = [("base", 0)] + [("finetune", i) for i in range(1, n_models + 1)]
    return [(os.path.join(folder, f"demo-{arch}-base.safetensors" if role == "base"
                          else f"demo-{arch}-finetune{seed}.safetensors"), role, seed) for role, seed in specs]


def write_demo_set(folder: str, arch: str = "sd1", n_models: int = 3, scale_down: int = DEMO_SCALE_DOWN,
                   dtype: str = "fp16", progress: SynthProgress | None = None) -> list[str]:
    """A base and n fine-tunes in ``folder`` (skips files that exist)."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for path, role, seed in demo_set_paths(folder, arch, n_models):
        if not os.path.exists(path):
            write_synthetic(path, arch, role, seed=seed, dtype=dtype, scale_down=scale_down, progress=progress)
        paths.append(path)
    return paths
