"""Recognise a LoRA file by its keys and group its tensors into modules.

A LoRA is known by content, never by file extension: its keys end in the
suffixes of an adapter type (``lora_down``/``lora_up``, PEFT ``lora_A``/``lora_B``,
LoHa ``hada_*``, LoKr ``lokr_*``) and it holds no Stable Diffusion checkpoint
keys.  Each module (one patched layer) gets its parts by name; the types a
merge cannot express as a weight delta without more than the base (IA3, OFT,
GLoRA, norm, full diff) are refused in one line naming the file, key and type.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from ..arch import detect_arch
from ..checkpoint import Checkpoint
from ..errors import CheckpointError
from .keymap import TE1_FAMILY, TE2_FAMILY, TE_FAMILY, UNET_FAMILY

# suffix -> (module type, part name); longest suffixes first when matching
_PARTS: dict[str, tuple[str, str]] = {
    ".lora_down.weight": ("lora", "down"), ".lora_up.weight": ("lora", "up"),
    ".lora_mid.weight": ("lora", "mid"), ".lora_A.weight": ("lora", "down"), ".lora_B.weight": ("lora", "up"),
    ".lora.down.weight": ("lora", "down"), ".lora.up.weight": ("lora", "up"),
    ".lora_magnitude_vector": ("lora", "dora_scale"), ".lora_magnitude_vector.weight": ("lora", "dora_scale"),
    ".hada_w1_a": ("loha", "w1a"), ".hada_w1_b": ("loha", "w1b"), ".hada_w2_a": ("loha", "w2a"),
    ".hada_w2_b": ("loha", "w2b"), ".hada_t1": ("loha", "t1"), ".hada_t2": ("loha", "t2"),
    ".lokr_w1": ("lokr", "w1"), ".lokr_w1_a": ("lokr", "w1a"), ".lokr_w1_b": ("lokr", "w1b"),
    ".lokr_w2": ("lokr", "w2"), ".lokr_w2_a": ("lokr", "w2a"), ".lokr_w2_b": ("lokr", "w2b"),
    ".lokr_t2": ("lokr", "t2"),
    ".alpha": ("any", "alpha"), ".scale": ("any", "scale"), ".dora_scale": ("any", "dora_scale"),
    # recognised so they are refused by name, not reported as unknown keys
    ".on_input": ("IA3", "x"), ".oft_blocks": ("OFT", "x"), ".oft_diag": ("OFT", "x"),
    ".a1.weight": ("GLoRA", "x"), ".a2.weight": ("GLoRA", "x"), ".b1.weight": ("GLoRA", "x"),
    ".b2.weight": ("GLoRA", "x"), ".w_norm": ("norm", "x"), ".b_norm": ("norm", "x"),
    ".diff": ("full diff", "x"), ".diff_b": ("full diff", "x"),
}
_SUFFIXES = sorted(_PARTS, key=len, reverse=True)
_SUPPORTED = ("lora", "loha", "lokr")
_FAMILIES = [("lora_unet_", UNET_FAMILY, False), ("lora_te1_", TE1_FAMILY, False), ("lora_te2_", TE2_FAMILY, False),
             ("lora_te_", TE_FAMILY, False), ("unet.", UNET_FAMILY, True), ("text_encoder_2.", TE2_FAMILY, True),
             ("text_encoder.", TE1_FAMILY, True)]
SUPPORTED_TEXT = "LoRA/LoCon (kohya or PEFT names), LoHa, LoKr"


@dataclass
class Module:
    """One patched layer: its name as written, its family and name for lookup, its parts' keys."""

    raw: str
    family: str
    name: str
    kind: str = ""
    parts: dict[str, str] = field(default_factory=dict)   # part -> key in the LoRA file


def split_family(module: str) -> tuple[str, str] | None:
    """'lora_unet_down_blocks_0_...' -> ('unet', 'down_blocks_0_...'); PEFT dots become underscores."""
    for prefix, family, dotted in _FAMILIES:
        if module.startswith(prefix):
            rest = module[len(prefix):]
            return family, rest.replace(".", "_") if dotted else rest
    return None


_MOST_DOTS = max(suffix.count(".") for suffix in _PARTS)


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(module, kind, part) by the longest known suffix; each suffix is whole dot-separated segments, so the
    last 3, 2, 1 segments are looked up (a dict probe each: a LoRA has tens of thousands of keys)."""
    dot = len(key)
    cuts = []
    for _ in range(_MOST_DOTS):
        dot = key.rfind(".", 0, dot)
        if dot <= 0:
            break
        cuts.append(dot)
    for dot in reversed(cuts):
        found = _PARTS.get(key[dot:])
        if found is not None:
            return key[:dot], found[0], found[1]
    return None


def looks_like_lora(ckpt: Checkpoint) -> bool:
    """True for a file of adapter factors: LoRA suffixes on some keys and no SD checkpoint keys."""
    keys = ckpt.keys()
    if not keys or detect_arch(ckpt.shapes()) is not None:
        return False
    for key in keys:
        split = _split_key(key)
        if split is not None and split_family(split[0]) is not None and split[1] != "any":
            return True
    return False


_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "cond_stage_model.", "conditioner.embedders.",
                        "first_stage_model.")


def keys_look_like_lora(keys: Iterable[str]) -> bool:
    """:func:`looks_like_lora` from the key names alone (a folder listing reads no shapes): some key is an
    adapter factor of a known family, and none is a Stable Diffusion checkpoint's."""
    hits = 0
    for key in keys:
        if key.startswith(_CHECKPOINT_PREFIXES):
            return False
        if not hits:
            split = _split_key(key)
            hits = split is not None and split[1] != "any" and split_family(split[0]) is not None
    return bool(hits)


def parse_modules(ckpt: Checkpoint) -> list[Module]:
    """The file's modules, each with its parts; refuses unknown keys and unsupported types in one line."""
    modules: dict[str, Module] = {}
    splits = [(key, _split_key(key)) for key in ckpt.keys()]
    for key, split in splits:   # an unsupported type first: its other keys (IA3's .weight) would look unknown
        if split is not None and split[1] not in (*_SUPPORTED, "any"):
            raise CheckpointError(f"is a {split[1]} adapter, which cannot be merged (supported: {SUPPORTED_TEXT})",
                                  ckpt.path, key)
    for key, split in splits:
        family = split_family(split[0]) if split else None
        if split is None or family is None:
            raise CheckpointError("is not part of a LoRA this merger reads (expected lora_unet_/lora_te*_ or "
                                  "unet./text_encoder. names with lora_down/lora_up, lora_A/lora_B, hada_* "
                                  "or lokr_* parts)", ckpt.path, key)
        raw, kind, part = split
        module = modules.setdefault(raw, Module(raw, family[0], family[1]))
        if kind == "any":
            module.parts[part] = key
            continue
        if kind not in _SUPPORTED:
            raise CheckpointError(f"is a {kind} adapter, which cannot be merged (supported: {SUPPORTED_TEXT})",
                                  ckpt.path, key)
        if module.kind and module.kind != kind:
            raise CheckpointError(f"mixes {module.kind} and {kind} parts in one module", ckpt.path, key)
        module.kind = kind
        if part in module.parts:
            raise CheckpointError(f"holds the {part} factor of module {raw} twice (two naming styles?)",
                                  ckpt.path, key)
        module.parts[part] = key
    out = []
    for module in modules.values():
        first = next(iter(module.parts.values()))
        if not module.kind:
            raise CheckpointError(f"holds only {', '.join(module.parts)} for module {module.raw}, no factors",
                                  ckpt.path, first)
        missing = _missing_parts(module)
        if missing:
            raise CheckpointError(f"{module.kind} module {module.raw} lacks its {missing} factor", ckpt.path, first)
        for part in ("t1", "t2"):
            if part in module.parts:
                raise CheckpointError(f"is a Tucker-decomposed {module.kind.upper()} (CP/Tucker {part}), which this "
                                      f"merger does not read (supported: {SUPPORTED_TEXT})",
                                      ckpt.path, module.parts[part])
        out.append(module)
    return out


def _missing_parts(module: Module) -> str | None:
    p = module.parts
    if module.kind == "lora":
        return next((n for n in ("down", "up") if n not in p), None)
    if module.kind == "loha":
        return next((n for n in ("w1a", "w1b", "w2a", "w2b") if n not in p), None)
    for w in ("w1", "w2"):
        if w not in p and not (w + "a" in p and w + "b" in p):
            return f"lokr_{w}"
    return None


def lora_arch_hint(modules: list[Module], metadata: dict[str, str]) -> str | None:
    """'sdxl', 'sd1', 'sd2' or 'sd1/sd2' when the names or metadata say what the LoRA was made for.

    SD1 and SD2 LoRAs share their names; only kohya's metadata (``ss_v2``,
    ``ss_base_model_version``, ``modelspec.architecture``) tells them apart,
    and without it a wrong pairing still fails the shape check.
    """
    version = metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")
    if "sdxl" in version or "xl-v1" in version:
        return "sdxl"
    if metadata.get("ss_v2") == "True" or re.search(r"sd_v2|stable-diffusion-v2", version):
        return "sd2"
    if re.search(r"sd_v1|stable-diffusion-v1", version):
        return "sd1"
    if re.search(r"sd_v[12]|stable-diffusion-v[12]", version):
        return "sd1/sd2"
    families = {m.family for m in modules}
    if TE2_FAMILY in families:
        return "sdxl"
    if TE_FAMILY in families:
        return "sd1/sd2"
    for m in modules:
        if m.family != UNET_FAMILY:
            continue
        if re.match(r"^(input_blocks_(9|10|11)_|output_blocks_(9|10|11)_|input_blocks_[12]_1_|"
                    r"down_blocks_3_|down_blocks_0_attentions_)", m.name):
            return "sd1/sd2"
        if re.search(r"transformer_blocks_[1-9]_", m.name):
            return "sdxl"
    return None


def lora_summary(ckpt: Checkpoint) -> dict:
    """What ``inspect`` shows for a LoRA: module counts by type and part, ranks, the model it was made for.

    Unsupported files are summarised too (with ``error``), so inspect can say why a merge would refuse them.
    """
    out: dict = {"modules": 0}
    try:
        modules = parse_modules(ckpt)
    except CheckpointError as exc:
        out["error"] = str(exc)
        return out
    ranks = []
    kinds: dict[str, int] = {}
    families: dict[str, int] = {}
    for m in modules:
        kinds[m.kind] = kinds.get(m.kind, 0) + 1
        families[m.family] = families.get(m.family, 0) + 1
        rank_part = {"lora": "down", "loha": "w1b", "lokr": "w1b"}.get(m.kind)
        if rank_part in m.parts:
            ranks.append(ckpt.info(m.parts[rank_part]).shape[0])
    out.update(modules=len(modules), types=kinds, parts=families,
               ranks=[min(ranks), max(ranks)] if ranks else None,
               made_for=lora_arch_hint(modules, ckpt.metadata),
               dora=sum("dora_scale" in m.parts for m in modules),
               peft=any(m.raw.startswith(("unet.", "text_encoder")) for m in modules))
    return out
