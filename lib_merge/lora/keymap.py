"""LoRA module names <-> the base checkpoint's keys, for SD1, SD2 and SDXL.

A LoRA names the layer it patches, not the checkpoint key: kohya writes
``lora_unet_`` + the module path with ``.`` turned into ``_`` (diffusers block
names for SD1/SD2, LDM names for SDXL), ``lora_te_``/``lora_te1_``/``lora_te2_``
for the text encoders in Hugging Face CLIP names, and PEFT writes dotted
diffusers names under ``unet.``/``text_encoder.``/``text_encoder_2.``.  The
map is built from the base's own key list, so every name is checked against
a key that exists, and each UNet layer answers to both its LDM and its
diffusers name.  OpenCLIP text encoders (SD2, SDXL's second) store q, k and v
fused in one ``in_proj_weight``: their LoRAs land on row slices of it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..arch import UNET_PREFIX

# families a LoRA module name belongs to (see formats.split_family)
UNET_FAMILY, TE_FAMILY, TE1_FAMILY, TE2_FAMILY = "unet", "te", "te1", "te2"
FAMILY_PREFIX = {UNET_FAMILY: "lora_unet_", TE_FAMILY: "lora_te_", TE1_FAMILY: "lora_te1_",
                 TE2_FAMILY: "lora_te2_"}

_SD1_TE = "cond_stage_model.transformer."
_SD2_TE = "cond_stage_model.model.transformer.resblocks."
_XL_TE1 = "conditioner.embedders.0.transformer."
_XL_TE2 = "conditioner.embedders.1.model.transformer.resblocks."
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2",
           "emb_layers.1": "time_emb_proj", "skip_connection": "conv_shortcut"}
_OPENCLIP = {"attn.out_proj.weight": "self_attn_out_proj", "mlp.c_fc.weight": "mlp_fc1",
             "mlp.c_proj.weight": "mlp_fc2"}


@dataclass(frozen=True)
class Target:
    """Where one LoRA module lands: a base key, and for fused q/k/v the rows [start, stop) of it."""

    key: str
    rows: tuple[int, int] | None = None


def _underscore(path: str) -> str:
    return path.replace(".", "_")


def ldm_to_diffusers(path: str) -> str | None:
    """An LDM UNet module path (after ``model.diffusion_model.``) in diffusers naming, or None.

    The rule is the same for SD1/SD2 and SDXL (levels of three blocks); which
    blocks exist is the base's business, so only existing keys are converted.
    """
    parts = path.split(".")
    if parts[0] == "input_blocks" and len(parts) >= 3:
        n, sub, rest = int(parts[1]), parts[2], parts[3:]
        if n == 0:
            return ".".join(["conv_in", *rest])
        i, j = (n - 1) // 3, (n - 1) % 3
        if j == 2:   # input_blocks.{3+3i}.0.op
            return ".".join([f"down_blocks.{i}.downsamplers.0.conv", *rest[1:]]) if rest[:1] == ["op"] else None
        if sub == "0":
            return _resnet(f"down_blocks.{i}.resnets.{j}", rest)
        return ".".join([f"down_blocks.{i}.attentions.{j}", *rest])
    if parts[0] == "middle_block" and len(parts) >= 2:
        sub, rest = parts[1], parts[2:]
        if sub == "1":
            return ".".join(["mid_block.attentions.0", *rest])
        return _resnet(f"mid_block.resnets.{0 if sub == '0' else 1}", rest)
    if parts[0] == "output_blocks" and len(parts) >= 3:
        n, sub, rest = int(parts[1]), parts[2], parts[3:]
        i, j = n // 3, n % 3
        if sub == "0":
            return _resnet(f"up_blocks.{i}.resnets.{j}", rest)
        if rest[:1] == ["conv"]:
            return ".".join([f"up_blocks.{i}.upsamplers.0.conv", *rest[1:]])
        return ".".join([f"up_blocks.{i}.attentions.{j}", *rest])
    simple = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "out.0": "conv_norm_out", "out.2": "conv_out", "label_emb.0.0": "add_embedding.linear_1",
              "label_emb.0.2": "add_embedding.linear_2"}
    for ldm, diffusers in simple.items():
        if path == ldm or path.startswith(ldm + "."):
            return diffusers + path[len(ldm):]
    return None


def _resnet(prefix: str, rest: list[str]) -> str | None:
    joined = ".".join(rest)
    for ldm, diffusers in _RESNET.items():
        if joined == ldm or joined.startswith(ldm + "."):
            return f"{prefix}.{diffusers}{joined[len(ldm):]}"
    return None


def _is_layer_weight(key: str, shape: Sequence[int]) -> bool:
    return key.endswith(".weight") and len(shape) in (2, 4)


def _te_layer(rest: str) -> bool:
    """Only encoder layers: kohya targets CLIP attention and MLP, never the embeddings."""
    return rest.startswith("text_model.encoder.layers.")


@dataclass
class KeyMap:
    """Both directions for one base checkpoint.

    ``by_name``: (family, underscore name) -> targets; ``names``: base key ->
    [(kohya module name, rows)] as this project writes them.
    """

    arch: str
    by_name: dict[tuple[str, str], list[Target]]
    names: dict[str, list[tuple[str, tuple[int, int] | None]]]

    def lookup(self, family: str, name: str) -> list[Target] | None:
        return self.by_name.get((family, name))


def build_keymap(shapes: Mapping[str, Sequence[int]], arch: str) -> KeyMap:
    """The LoRA names each layer weight of a base answers to, and the name each is written under."""
    by_name: dict[tuple[str, str], list[Target]] = {}
    names: dict[str, list[tuple[str, tuple[int, int] | None]]] = {}
    te_families = (TE_FAMILY, TE1_FAMILY) if arch in ("sd1", "sd2") else ()

    def add(families: Sequence[str], name: str, target: Target) -> None:
        for family in families:
            by_name.setdefault((family, name), []).append(target)

    for key, shape in shapes.items():
        if key.startswith(UNET_PREFIX) and _is_layer_weight(key, shape):
            path = key[len(UNET_PREFIX):-len(".weight")]
            ldm = _underscore(path)
            add([UNET_FAMILY], ldm, Target(key))
            diffusers = ldm_to_diffusers(path)
            if diffusers is not None and _underscore(diffusers) != ldm:
                add([UNET_FAMILY], _underscore(diffusers), Target(key))
            written = ldm if arch == "sdxl" or diffusers is None else _underscore(diffusers)
            names[key] = [("lora_unet_" + written, None)]
            continue
        hf = openclip = None
        if arch == "sd1" and key.startswith(_SD1_TE):
            hf, fams, prefix = key[len(_SD1_TE):], te_families, "lora_te_"
        elif arch == "sdxl" and key.startswith(_XL_TE1):
            hf, fams, prefix = key[len(_XL_TE1):], (TE1_FAMILY,), "lora_te1_"
        elif arch == "sd2" and key.startswith(_SD2_TE):
            openclip, fams, prefix = key[len(_SD2_TE):], te_families, "lora_te_"
        elif arch == "sdxl" and key.startswith(_XL_TE2):
            openclip, fams, prefix = key[len(_XL_TE2):], (TE2_FAMILY,), "lora_te2_"
        if hf is not None and _is_layer_weight(key, shape) and _te_layer(hf):
            name = _underscore(hf[:-len(".weight")])
            add(fams, name, Target(key))
            names[key] = [(prefix + name, None)]
        elif openclip is not None:
            match = re.match(r"^(\d+)\.(.+)$", openclip)
            if not match:
                continue
            layer, rest = match.group(1), match.group(2)
            stem = f"text_model_encoder_layers_{layer}_"
            if rest == "attn.in_proj_weight" and len(shape) == 2 and shape[0] % 3 == 0:
                h = shape[0] // 3
                parts = []
                for i, qkv in enumerate("qkv"):
                    name = f"{stem}self_attn_{qkv}_proj"
                    add(fams, name, Target(key, (i * h, (i + 1) * h)))
                    parts.append((prefix + name, (i * h, (i + 1) * h)))
                names[key] = parts
            elif rest in _OPENCLIP and len(shape) == 2:
                name = stem + _OPENCLIP[rest]
                add(fams, name, Target(key))
                names[key] = [(prefix + name, None)]
    return KeyMap(arch, by_name, names)
