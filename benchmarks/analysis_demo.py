"""The README's analysis pictures (issue 13): four small synthetic SD1 fine-tunes that differ where real ones do.

    .venv/bin/python benchmarks/analysis_demo.py [--out docs/img] [--work benchmarks/work/analysis-demo]

Plain synthetic fine-tunes change every block alike, which makes dull pictures.  These four are built
from one synthetic base (scale_down 8) with block-shaped changes, so each plot has something to show:

- ``style-a``: mostly the UNet's up blocks (OUT) - a "style" fine-tune;
- ``style-b``: 0.7 x style-a's change plus its own - a close relative (cosine ~0.7 with style-a);
- ``subject``: mostly the down and middle blocks (IN, M00) - a "subject" fine-tune;
- ``prompting``: mostly the text encoder (BASE) - a model trained on captions;
- all four also share one change in the down blocks (IN), as fine-tunes of one family share a drift, so
  the models disagree less there.

Then ``analyze`` with TIES (k 0.3) and ``write_plots``; the PNGs are copied to ``--out`` as
``analysis-<plot>.png``.  Nothing here is a real model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# block-name prefix -> how strongly each demo model changes it (1 = the synthetic fine-tune's own size)
PROFILES = {
    "style-a": {"BASE": 0.2, "IN": 0.3, "M00": 0.5, "OUT": 2.0},
    "subject": {"BASE": 0.3, "IN": 2.0, "M00": 2.0, "OUT": 0.6},
    "prompting": {"BASE": 3.0, "IN": 0.2, "M00": 0.2, "OUT": 0.2},
}


def _factor(profile: dict, block: str | None) -> float:
    if block is None:
        return 0.0
    for prefix, value in profile.items():
        if block.startswith(prefix):
            return value
    return 0.0


def write_demo(work: str, scale_down: int = 8) -> tuple[str, list[str]]:
    """The base and the four fine-tunes in ``work`` (fp16 safetensors, real SD1 key names)."""
    from safetensors.torch import load_file, save_file

    from lib_merge.arch import block_of
    from lib_merge.synth import write_synthetic
    os.makedirs(work, exist_ok=True)
    base_path = os.path.join(work, "demo-base.safetensors")
    noise_paths = [os.path.join(work, f"noise{i}.safetensors") for i in (1, 2, 3, 4, 5)]
    write_synthetic(base_path, "sd1", "base", seed=0, scale_down=scale_down)
    for i, path in enumerate(noise_paths, 1):
        write_synthetic(path, "sd1", "finetune", seed=i, base_seed=0, scale_down=scale_down)
    base = load_file(base_path)
    deltas = []
    for path in noise_paths:
        tuned = load_file(path)
        deltas.append({k: tuned[k].float() - v.float() for k, v in base.items() if v.is_floating_point()})
        os.remove(path)

    def shared(key: str):   # the family's common change: the down blocks only
        block = block_of(key, "sd1")
        return deltas[4][key] * (1.0 if block and block.startswith("IN") else 0.0)

    def write(name: str, delta_of) -> str:
        out = {k: (v.float() + delta_of(k) + shared(k)).to(v.dtype) if k in deltas[0] else v
               for k, v in base.items()}
        path = os.path.join(work, f"{name}.safetensors")
        save_file(out, path)
        return path

    paths = [write("style-a", lambda k: deltas[0][k] * _factor(PROFILES["style-a"], block_of(k, "sd1"))),
             write("style-b", lambda k: (0.7 * deltas[0][k] + 0.5 * deltas[1][k])
                   * _factor(PROFILES["style-a"], block_of(k, "sd1"))),
             write("subject", lambda k: deltas[2][k] * _factor(PROFILES["subject"], block_of(k, "sd1"))),
             write("prompting", lambda k: deltas[3][k] * _factor(PROFILES["prompting"], block_of(k, "sd1")))]
    return base_path, paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "img"))
    parser.add_argument("--work", default=os.path.join(ROOT, "benchmarks", "work", "analysis-demo"))
    args = parser.parse_args(argv)
    from lib_merge.analysis import analyze
    from lib_merge.analysis.plots import write_plots
    from lib_merge.recipe import MergeRecipe
    base, models = write_demo(args.work)
    recipe = MergeRecipe(method="ties", base=base, models=models, k=0.3)
    analysis = analyze(base, models, recipe, device="cpu")
    with open(os.path.join(args.work, "analysis.json"), "w", encoding="utf-8") as handle:
        json.dump(analysis, handle, indent=1)
    os.makedirs(args.out, exist_ok=True)
    for path in write_plots(analysis, os.path.join(args.work, "plots")):
        name = os.path.basename(path).split("-", 1)[1]
        target = os.path.join(args.out, f"analysis-{name}")
        shutil.copyfile(path, target)
        print(f"{target} ({os.path.getsize(target) // 1024} KB)")
    from lib_merge.analysis.plots import summary_text
    print(summary_text(analysis))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
