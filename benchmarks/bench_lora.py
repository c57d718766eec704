"""Issue 11 benchmarks: baking LoRAs into a base, and writing a merge as a LoRA, as ratios in one run.

1. baking 10 LoRAs (rank 32, every kohya module incl. LoCon convs) onto a base with add_difference,
   against a 2-model add_difference of the same base (target <= 2x); beside it, 10 full checkpoints
   against the same reference: what N models cost the engine with no LoRA maths at all (the floor);
2. a merge written as a rank-64 LoRA (--out-lora, no --out), against the same merge written as a
   checkpoint (target <= 3x).

Each is a fresh ``python -m lib_merge merge`` process, timed from spawn to exit (wall, and the CPU time of
it and its worker processes), alternated (reference, candidate) ``--repeats`` times; the medians and their
ratios are printed and appended to RESULTS.md.  Synthetic inputs (lib_merge.synth, real SDXL keys) are written under ``--work``.

    python benchmarks/bench_lora.py --arch sdxl --scale-down 4      # ~430 MB per SDXL file
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_loras(base: str, folder: str, n: int, rank: int) -> list[str]:
    """``n`` kohya LoRAs covering every layer the keymap names (convs as LoCon), fp16."""
    import torch
    from safetensors.torch import save_file

    from lib_merge.checkpoint import open_checkpoint
    from lib_merge.lora.keymap import build_keymap
    paths = []
    with open_checkpoint(base) as ckpt:
        shapes, arch = ckpt.shapes(), ckpt.arch
    names = build_keymap(shapes, arch).names
    for i in range(n):
        path = os.path.join(folder, f"lora{i}-r{rank}.safetensors")
        paths.append(path)
        if os.path.exists(path):
            continue
        gen = torch.Generator().manual_seed(i)
        tensors = {}
        for key, modules in names.items():
            shape = shapes[key]
            for name, rows in modules:
                out = rows[1] - rows[0] if rows else shape[0]
                r = min(rank, out, int(torch.tensor(shape[1:]).prod()))
                conv = len(shape) == 4
                down = torch.randn(r, *shape[1:], generator=gen) * 0.02 if conv else \
                    torch.randn(r, shape[1], generator=gen) * 0.02
                up = torch.randn(out, r, *((1, 1) if conv else ()), generator=gen) * 0.02
                tensors[f"{name}.lora_down.weight"] = down.half()
                tensors[f"{name}.lora_up.weight"] = up.half()
                tensors[f"{name}.alpha"] = torch.tensor(float(r)).half()
        save_file(tensors, path)
    return paths


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and its workers): on a shared machine the CPU time is the
    steadier figure (other jobs stretch the wall time, not the work done)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sdxl", choices=["sd1", "sdxl"])
    ap.add_argument("--scale-down", type=int, default=4)
    ap.add_argument("--work", default=os.path.join(ROOT, "benchmarks", "work", "lora"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-loras", type=int, default=10)
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = ap.parse_args()
    from lib_merge.synth import write_synthetic
    folder = os.path.join(args.work, f"{args.arch}-s{args.scale_down}")
    os.makedirs(folder, exist_ok=True)
    base = os.path.join(folder, "base.safetensors")
    fts = [os.path.join(folder, f"ft{i}.safetensors") for i in (1, 2)]
    if not os.path.exists(base):
        write_synthetic(base, args.arch, "base", seed=0, scale_down=args.scale_down)
    for i, path in enumerate(fts, 1):
        if not os.path.exists(path):
            write_synthetic(path, args.arch, "finetune", seed=i, base_seed=0, scale_down=args.scale_down)
    loras = write_loras(base, folder, args.n_loras, 32)
    out = os.path.join(folder, "out.safetensors")
    out_lora = os.path.join(folder, "out-lora.safetensors")
    merge = [sys.executable, "-m", "lib_merge", "merge", "--base", base, "--device", args.device, "--quiet",
             "--overwrite"]
    jobs = {
        "bake": ([*merge, "--models", *fts, "--method", "add_difference", "--p", "0", "--out", out],
                 [*merge, "--models", *loras, "--method", "add_difference", "--p", "0", "--out", out]),
        # the engine's own cost of N models: as many full checkpoints as LoRAs, no LoRA maths at all
        "floor": ([*merge, "--models", *fts, "--method", "add_difference", "--p", "0", "--out", out],
                  [*merge, "--models", *(fts * (args.n_loras // 2)), "--method", "add_difference", "--p", "0",
                   "--out", out]),
        "write_lora": ([*merge, "--models", *fts, "--method", "dare_ties_soup", "--out", out],
                       [*merge, "--models", *fts, "--method", "dare_ties_soup", "--out-lora", out_lora,
                        "--lora-rank", "64"]),
    }
    timed(jobs["bake"][0])   # warm the page cache and the hash cache
    rows = []
    for name, (ref, cand) in jobs.items():
        ref_s, cand_s = [], []
        for _ in range(args.repeats):
            ref_s.append(timed(ref))
            cand_s.append(timed(cand))
        r, c = (statistics.median(x[0] for x in ref_s), statistics.median(x[0] for x in cand_s))
        rc, cc = (statistics.median(x[1] for x in ref_s), statistics.median(x[1] for x in cand_s))
        rows.append((name, r, c, c / r, rc, cc, cc / rc))
    size = os.path.getsize(base) / 1e6
    lines = [f"## {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC · LoRA · {args.arch} scale-down {args.scale_down} "
             f"({size:.0f} MB a file) · {args.device} · repeats {args.repeats}",
             "", f"`python benchmarks/bench_lora.py {' '.join(sys.argv[1:])}` on {platform.node()}, "
             f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}", "",
             "| job | reference | reference s | candidate s | ratio | CPU s (ref / cand) | CPU ratio | target |",
             "|---|---|---|---|---|---|---|---|"]
    what = {"bake": ("2-model add_difference", f"{args.n_loras} LoRAs rank 32 baked (add_difference)", "≤ 2×"),
            "floor": ("2-model add_difference", f"{args.n_loras // 2 * 2} full checkpoints (add_difference)",
                      "(the engine's N-model floor)"),
            "write_lora": ("dare_ties_soup N=2 → --out", "same → --out-lora rank 64", "≤ 3×")}
    for name, r, c, ratio, rc, cc, cpu_ratio in rows:
        ref_text, cand_text, target = what[name]
        lines.append(f"| {cand_text} | {ref_text} | {r:.1f} | {c:.1f} | {ratio:.2f}× | {rc:.1f} / {cc:.1f} | "
                     f"{cpu_ratio:.2f}× | {target} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.no_record:
        return 0
    with open(os.path.join(ROOT, "benchmarks", "RESULTS.md"), "a", encoding="utf-8") as handle:
        handle.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
