"""A LoRA module's weight delta, built from its small factors a few rows at a time.

delta = scale * up @ down with scale = alpha / rank (no alpha: 1; alpha 0: no
effect), as A1111 (``network.py calc_scale``) and Forge compute it; a
``.scale`` tensor overrides alpha/rank as in A1111.  LoHa is
(w1a @ w1b) * (w2a @ w2b) * alpha / rank, LoKr kron(w1, w2) * alpha / rank
(rank from a ``_b`` factor; without one alpha is ignored).  Rows of a LoRA or
LoHa delta depend only on the same rows of ``up`` (``w1a``, ``w2a``), so the
reader builds just the rows a merge chunk needs: memory stays one chunk, not
one tensor, per LoRA.  Everything is float32 on the device asked for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..checkpoint import Checkpoint
from ..errors import CheckpointError
from .formats import Module


def _shape(ckpt: Checkpoint, module: Module, part: str) -> tuple[int, ...]:
    return tuple(ckpt.info(module.parts[part]).shape)


def _cols(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def module_shape(ckpt: Checkpoint, module: Module) -> tuple[int, int, str]:
    """(rows, columns) of the module's delta as a 2-D matrix, and its factor shapes for messages.

    Refuses factors that cannot multiply (a rank that differs between them).
    """
    s = {part: _shape(ckpt, module, part) for part in module.parts if part not in ("alpha", "scale")}
    text = " · ".join(f"{p} {list(v)}" for p, v in s.items() if p != "dora_scale")

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"factor shapes do not fit: {why} ({text})", ckpt.path, module.parts[next(iter(s))])

    if module.kind == "lora":
        up, down = s["up"], s["down"]
        if len(up) < 2 or len(down) < 2:
            raise bad("lora_up and lora_down must have 2 or 4 dimensions")
        rank_up = math.prod(up[1:])
        if "mid" in s:
            mid = s["mid"]
            if len(mid) != 4 or mid[0] != rank_up or mid[1] != down[0]:
                raise bad("lora_mid must be [rank, rank, kh, kw] between lora_up and lora_down")
            return up[0], _cols(down) * mid[2] * mid[3], text
        if rank_up != down[0]:
            raise bad(f"lora_up has rank {rank_up}, lora_down {down[0]}")
        return up[0], _cols(down), text
    if module.kind == "loha":
        w1a, w1b, w2a, w2b = s["w1a"], s["w1b"], s["w2a"], s["w2b"]
        if w1a[0] != w2a[0] or _cols(w1b) != _cols(w2b) or w1a[-1] != w1b[0] or w2a[-1] != w2b[0]:
            raise bad("hada_w1 and hada_w2 products differ in shape or rank")
        return w1a[0], _cols(w1b), text
    dims = []
    for w in ("w1", "w2"):
        if w in s:
            dims.append(s[w])
        else:
            a, b = s[w + "a"], s[w + "b"]
            if a[-1] != b[0]:
                raise bad(f"lokr_{w}_a has rank {a[-1]}, lokr_{w}_b {b[0]}")
            dims.append((a[0], *b[1:]))
    (p, q), w2 = dims[0][:2], dims[1]
    return p * w2[0], q * _cols(w2), text


@dataclass
class Factors:
    """A module's factors loaded for computing: float32 on one device, and its scale."""

    kind: str
    t: dict[str, torch.Tensor]
    scale: float
    dora_scale: torch.Tensor | None


def _scalar(ckpt: Checkpoint, key: str, value: torch.Tensor | None = None) -> float:
    value = (ckpt.tensor(key) if value is None else value).float().reshape(-1)
    if value.numel() != 1 or not math.isfinite(float(value[0])):
        raise CheckpointError("must be one finite number", ckpt.path, key)
    return float(value[0])


def module_scale(ckpt: Checkpoint, module: Module, read: dict[str, torch.Tensor] | None = None) -> float:
    """alpha / rank as the hosts apply it (no alpha: 1; a .scale tensor overrides it, as in A1111).

    ``read``: the module's tensors by part, where the caller has them already.
    """
    p, read = module.parts, read or {}
    if "scale" in p:
        return _scalar(ckpt, p["scale"], read.get("scale"))
    if module.kind == "lora":
        rank = ckpt.info(p["down"]).shape[0]
    elif module.kind == "loha":
        rank = ckpt.info(p["w1b"]).shape[0]
    else:
        bs = [p[w] for w in ("w1b", "w2b") if w in p]
        if not bs:
            return 1.0   # a full-matrix LoKr: the hosts ignore alpha
        rank = ckpt.info(bs[0]).shape[0]
    if "alpha" not in p:
        return 1.0
    return _scalar(ckpt, p["alpha"], read.get("alpha")) / max(rank, 1)


def load_factors(ckpt: Checkpoint, module: Module, device: torch.device) -> Factors:
    """Read a module's factors once (they are small) as float32 on ``device``."""
    parts = list(module.parts)
    read = dict(zip(parts, ckpt.tensors([module.parts[p] for p in parts], float32=True)))   # one read
    t = {part: value.to(device=device, dtype=torch.float32) for part, value in read.items()
         if part not in ("alpha", "scale", "dora_scale")}
    dora = read.get("dora_scale")
    return Factors(module.kind, t, module_scale(ckpt, module, read),
                   dora.to(device=device, dtype=torch.float32) if dora is not None else None)


def delta_rows(f: Factors, r0: int, r1: int, rows: int, cols: int) -> torch.Tensor:
    """Rows [r0, r1) of the module's delta as a [r1 - r0, cols] float32 matrix (scale applied)."""
    t = f.t
    if f.kind == "lora":
        up = t["up"].reshape(rows, -1)[r0:r1]
        if "mid" in t:
            mid, down = t["mid"], t["down"].reshape(t["down"].shape[0], -1)
            out = torch.einsum("pi,ijkl,jr->prkl", up, mid, down).reshape(r1 - r0, cols)
        else:
            out = up @ t["down"].reshape(up.shape[1], -1)
    elif f.kind == "loha":
        w1b, w2b = t["w1b"].reshape(t["w1b"].shape[0], -1), t["w2b"].reshape(t["w2b"].shape[0], -1)
        out = (t["w1a"].reshape(rows, -1)[r0:r1] @ w1b) * (t["w2a"].reshape(rows, -1)[r0:r1] @ w2b)
    else:
        w1 = t["w1"] if "w1" in t else t["w1a"] @ t["w1b"]
        w2 = t["w2"] if "w2" in t else t["w2a"] @ t["w2b"].reshape(t["w2b"].shape[0], -1)
        if "w2b" in t and "w2" not in t and t["w2b"].dim() == 4:
            w2 = w2.reshape(w2.shape[0], *t["w2b"].shape[1:])
        if w2.dim() == 4:
            w1 = w1.reshape(*w1.shape, 1, 1)
        out = torch.kron(w1, w2).reshape(rows, cols)[r0:r1]
    return out.reshape(r1 - r0, cols) * f.scale


def is_plain(f: Factors) -> bool:
    """up @ down and nothing else (no Tucker mid, no DoRA): rows of it stack with other LoRAs' (lora/fold.py)."""
    return f.kind == "lora" and "mid" not in f.t and f.dora_scale is None


def add_rows_(out: torch.Tensor, f: Factors, r0: int, r1: int, rows: int, cols: int, overwrite: bool = False,
              weight: float = 1.0) -> None:
    """``out += weight * rows [r0, r1) of the delta`` (``out =`` with ``overwrite``), one fused addmm for a plain LoRA.

    Allocating a fresh delta per window, zeroing and adding it were measured
    to take longer than the product itself (page faults, passes over memory).
    """
    if is_plain(f):
        up = f.t["up"].reshape(rows, -1)[r0:r1]
        out.addmm_(up, f.t["down"].reshape(up.shape[1], -1), beta=0.0 if overwrite else 1.0, alpha=f.scale * weight)
    elif overwrite:
        out.copy_(delta_rows(f, r0, r1, rows, cols).mul_(weight))
    else:
        out.add_(delta_rows(f, r0, r1, rows, cols), alpha=weight)
