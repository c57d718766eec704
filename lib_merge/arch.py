"""Stable Diffusion architectures: detection, components and UNet blocks.

Merging an SD1 fine-tune into an SDXL base would silently produce garbage if
keys happened to match, so the architecture is read from the keys and shapes
(UNet first: it is present in every full checkpoint) and mismatches refused.
Components decide what gets merged (UNet, text encoders), what is taken from
the base (VAE, unknown buffers) and what is dropped (EMA).  Blocks give the
usual "MBW" notation: 26 values for SD1/SD2, 20 for SDXL.
"""
from __future__ import annotations

import gzip
import json
import os
import re
from typing import Callable, Mapping, Sequence

UNET = "unet"
TEXT_ENCODER = "te"
VAE = "vae"
EMA = "ema"
OTHER = "other"

UNET_PREFIX = "model.diffusion_model."
_TE_PREFIXES = ("cond_stage_model.", "conditioner.embedders.")
_VAE_PREFIX = "first_stage_model."
_EMA_PREFIX = "model_ema."

ARCH_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
BLOCK_COUNTS = {"sd1": 26, "sd2": 26, "sdxl": 20}
_UNET_DEPTH = {"sd1": 12, "sd2": 12, "sdxl": 9}

_SDXL_MARKER = UNET_PREFIX + "label_emb.0.0.weight"
_CROSS_ATTN_K = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_IN_OUT = re.compile(r"^model\.diffusion_model\.(input_blocks|output_blocks)\.(\d+)\.")


def component_of(key: str) -> str:
    """Which part of the model a key belongs to."""
    if key.startswith(UNET_PREFIX):
        return UNET
    if key.startswith(_TE_PREFIXES):
        return TEXT_ENCODER
    if key.startswith(_VAE_PREFIX):
        return VAE
    if key.startswith(_EMA_PREFIX):
        return EMA
    return OTHER


def detect_arch(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """'sd1', 'sd2', 'sdxl', or None when the keys are not an SD checkpoint's.

    SDXL is the only one with a class-label embedding; SD1 and SD2 differ in
    the cross-attention context width (CLIP-L 768 vs OpenCLIP-H 1024).  The
    text-encoder layout decides when the UNet probe key is absent.
    """
    if _SDXL_MARKER in shapes or any(k.startswith("conditioner.embedders.1.model.") for k in shapes):
        return "sdxl"
    k_shape = shapes.get(_CROSS_ATTN_K)
    if k_shape is not None and len(k_shape) == 2:
        if k_shape[1] == 768:
            return "sd1"
        if k_shape[1] == 1024:
            return "sd2"
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        return "sd1"
    return None


def block_labels(arch: str) -> list[str]:
    """Block names in the order of the block-weight notation."""
    depth = _UNET_DEPTH[arch]
    return (["BASE"] + [f"IN{i:02d}" for i in range(depth)] + ["M00"]
            + [f"OUT{i:02d}" for i in range(depth)])


def block_of(key: str, arch: str) -> str | None:
    """Block label of a UNet or text-encoder key (None for VAE/EMA/other)."""
    component = component_of(key)
    if component == TEXT_ENCODER:
        return "BASE"
    if component != UNET:
        return None
    match = _IN_OUT.match(key)
    depth = _UNET_DEPTH[arch]
    if match:
        index = int(match.group(2))
        if index >= depth:
            return None
        return ("IN" if match.group(1) == "input_blocks" else "OUT") + f"{index:02d}"
    rest = key[len(UNET_PREFIX):]
    if rest.startswith("middle_block."):
        return "M00"
    if rest.startswith(("time_embed.", "label_emb.")):
        return "IN00"
    if rest.startswith("out."):
        return f"OUT{depth - 1:02d}"
    return None


def parse_block_values(text: str | Sequence[float], arch: str, what: str = "block weights") -> dict[str, float]:
    """'v1,v2,...' (26 for SD1/SD2, 20 for SDXL) -> {block label: value}."""
    if isinstance(text, str):
        items = [t for t in re.split(r"[,\s]+", text.strip()) if t]
        try:
            values = [float(t) for t in items]
        except ValueError as exc:
            raise ValueError(f"{what}: not a list of numbers: {text!r}") from exc
    else:
        values = [float(v) for v in text]
    labels = block_labels(arch)
    if len(values) != len(labels):
        raise ValueError(f"{what}: {ARCH_NAMES[arch]} takes {len(labels)} values "
                         f"({labels[0]},{labels[1]}..{labels[-1]}), got {len(values)}")
    return dict(zip(labels, values))


# Named block-weight shapes, as multipliers from 0 to 1 over the blocks, for the UI presets.
def _ramp(n: int, reverse: bool = False) -> list[float]:
    vals = [i / (n - 1) for i in range(n)]
    return vals[::-1] if reverse else vals


BLOCK_PRESETS: dict[str, Callable[[int], list[float]]] = {
    "flat": lambda n: [1.0] * n,
    "unet only (BASE 0)": lambda n: [0.0] + [1.0] * (n - 1),
    "in only": lambda n: [1.0] + [1.0] * ((n - 2) // 2) + [0.0] + [0.0] * ((n - 2) // 2),
    "out only": lambda n: [1.0] + [0.0] * ((n - 2) // 2) + [0.0] + [1.0] * ((n - 2) // 2),
    "ramp in→out": lambda n: [1.0] + _ramp(n - 1),
    "ramp out→in": lambda n: [1.0] + _ramp(n - 1, reverse=True),
}


def block_preset(name: str, arch: str, scale: float = 1.0) -> str:
    """A named preset as the comma-separated notation, multiplied by ``scale``."""
    values = BLOCK_PRESETS[name](BLOCK_COUNTS[arch])
    return ",".join(f"{v * scale:g}" for v in values)


# ----------------------------------------------------------------------------- shipped key lists

_ARCH_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "arch_data")


def reference_keys(arch: str) -> list[dict]:
    """Every key, shape and dtype of a real single-file checkpoint of ``arch``.

    A compacted copy of the project's arch fixtures, shipped so the synthetic
    checkpoint generator and the tests need nothing outside the package.
    """
    with gzip.open(os.path.join(_ARCH_DATA, f"{arch}.json.gz"), "rt") as handle:
        doc = json.load(handle)
    cols = doc["columns"]
    return [dict(zip(cols, row)) for row in doc["keys"]]
