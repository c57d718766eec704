"""One sd-mecha 1.1.8 merge, run with benchmarks/.venv-mecha/bin/python.

The spec (made by jobs.mecha_spec) names the sd-mecha recipe and its
parameters; everything else is sd-mecha's default (float32 merge on the CPU,
fp16 output, its own thread count and buffer sizes), as a user would run it.

    .venv-mecha/bin/python benchmarks/mecha_merge.py --spec '{"recipe": "ties_sum", ...}' \
        --base B --models M1 M2 M3 --out OUT
"""
from __future__ import annotations

import argparse
import json
import sys


def build_recipe(spec: dict, base_path: str, model_paths: list[str]):
    import sd_mecha

    base = sd_mecha.model(base_path)
    models = [sd_mecha.model(p) for p in model_paths]
    kind = spec["recipe"]
    if kind == "n_average":
        soup = sd_mecha.n_average(*models)
        return soup if spec.get("alpha", 1.0) == 1.0 else sd_mecha.weighted_sum(base, soup, alpha=spec["alpha"])
    # The public wrappers add_difference / add_difference_ties(_extended) fail in 1.1.8 when given a
    # merge-method node (merge space still None before finalisation), so the delta is added back with
    # the merge method itself, as sd-mecha's own add_ties_with_dare does.
    from sd_mecha.extensions.builtin.merge_methods import linear

    if kind == "ties_sum":
        deltas = [sd_mecha.subtract(m, base) for m in models]
        merged = sd_mecha.ties_sum(*deltas, k=spec["k"], vote_sgn=spec["vote_sgn"])
        return linear.add_difference(base, merged, alpha=spec.get("alpha", 1.0))
    if kind == "ties_sum_with_dropout":   # = sd_mecha.add_ties_with_dare, the public DARE-TIES recipe
        return sd_mecha.add_ties_with_dare(
            base, *models, probability=spec["probability"], rescale=spec["rescale"], k=spec["k"],
            vote_sgn=spec["vote_sgn"], apply_stock=spec["apply_stock"], seed=spec["seed"],
            alpha=spec.get("alpha", 1.0))
    raise SystemExit(f"unknown sd-mecha recipe {kind!r}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True, help="JSON from jobs.mecha_spec")
    ap.add_argument("--base", required=True)
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="default: sd-mecha's own choice")
    a = ap.parse_args()
    import sd_mecha
    import torch

    recipe = build_recipe(json.loads(a.spec), a.base, a.models)
    kwargs = {"merge_device": a.device, "merge_dtype": torch.float32, "output_dtype": torch.float16,
              "output": a.out}
    if a.threads is not None:
        kwargs["threads"] = a.threads
    sd_mecha.merge(recipe, **kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
