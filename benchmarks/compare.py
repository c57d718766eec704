"""Compare two merged checkpoints key by key (the harness's --check).

For jobs without randomness (weighted_sum, TIES with p = 0) our result and
sd-mecha's must agree up to float rounding: both compute in float32 and round
to fp16, in a different order of operations, so a difference of one fp16 step
on a few elements is expected and anything larger is a semantic mismatch.

    python benchmarks/compare.py A.safetensors B.safetensors
"""
from __future__ import annotations

import argparse
import json
import sys


GROUPS = (("unet", ("model.diffusion_model.",)), ("text_encoder", ("cond_stage_model.", "conditioner.")),
          ("vae", ("first_stage_model.",)))


def group_of(key: str) -> str:
    for name, prefixes in GROUPS:
        if key.startswith(prefixes):
            return name
    return "other"


def _fp16_steps(diff: float, magnitude: float) -> float:
    """How many fp16 steps ``diff`` is at ``magnitude`` (one step = 2^(exponent - 10))."""
    import math
    mag = max(abs(magnitude), 2.0 ** -14)
    return diff / 2.0 ** (math.floor(math.log2(mag)) - 10)


def compare(path_a: str, path_b: str) -> dict:
    """Per component: max |a - b| over the float keys both files hold, worst key, differing elements.

    ``model`` sums UNet, text encoder and VAE -- the weights both tools merge;
    ``other`` (scheduler buffers and the like) is reported apart, since tools
    treat those keys differently (ours copies them from the base).
    """
    from safetensors import safe_open

    stats: dict[str, dict] = {}
    with safe_open(path_a, "pt") as fa, safe_open(path_b, "pt") as fb:
        ka, kb = set(fa.keys()), set(fb.keys())
        for key in sorted(ka & kb):
            a, b = fa.get_tensor(key), fb.get_tensor(key)
            if not (a.is_floating_point() and b.is_floating_point()) or a.shape != b.shape or a.numel() == 0:
                continue
            a32, b32 = a.float().reshape(-1), b.float().reshape(-1)
            diff = (a32 - b32).abs()
            for name in (group_of(key), "model") if group_of(key) != "other" else ("other",):
                g = stats.setdefault(name, {"max_abs_diff": 0.0, "worst_key": None, "worst_in_fp16_steps": 0.0,
                                            "keys_compared": 0, "keys_differing": 0, "elements_differing": 0,
                                            "elements": 0})
                n_diff = int((diff > 0).sum())
                g["keys_compared"] += 1
                g["keys_differing"] += n_diff > 0
                g["elements_differing"] += n_diff
                g["elements"] += diff.numel()
                m = float(diff.max())
                if m > g["max_abs_diff"]:
                    i = int(diff.argmax())
                    g.update(max_abs_diff=m, worst_key=key,
                             worst_in_fp16_steps=round(_fp16_steps(m, float(a32[i])), 2),
                             worst_values=[float(a32[i]), float(b32[i])])
    out = stats.get("model", {"max_abs_diff": 0.0, "worst_key": None, "worst_in_fp16_steps": 0.0,
                              "keys_compared": 0, "keys_differing": 0, "elements_differing": 0, "elements": 0})
    out = dict(out)
    out["by_component"] = {k: v for k, v in stats.items() if k != "model"}
    out["only_in_a"] = sorted(ka - kb)[:5]
    out["only_in_b"] = sorted(kb - ka)[:5]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    a = ap.parse_args()
    print(json.dumps(compare(a.a, a.b), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
