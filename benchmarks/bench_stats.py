"""The merge statistics' cost: the same merge with statistics off and on, side by side in one run.

Issue 13 asks that gathering share / kept / elected agreement during the merge
cost at most 10 % of the merge's time.  Each case merges the same inputs into a
file (``api.merge_to_file``: the CLI's path, worker processes on the CPU,
input hashes cached after the warm-up) with ``stats=False`` and
``stats=True``, alternating off/on then on/off, and reports the best of each
and the median of the per-pair ratios, in wall time and in CPU time (this
process and its worker processes): these machines are shared, so see
/work/shared/docs/benchmarks.md ("Ratios, in one run").  The outputs are
compared byte for byte once (statistics must not change a bit).

    python benchmarks/bench_stats.py                                  # SD1 /8: ties, dare_ties, weighted_sum
    python benchmarks/bench_stats.py --scale-down 2 --methods ties    # 536 MB a file, 2.1 GB of inputs
    python benchmarks/bench_stats.py --scale-down 1 --methods ties    # full size (2.1 GB a file)
    python benchmarks/bench_stats.py --results                        # also append the table to RESULTS.md
"""
from __future__ import annotations

import argparse
import datetime
import filecmp
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

PRESETS = {"ties": {"k": 0.2}, "dare_ties": {"p": 0.5}, "dare_ties_soup": {"p": 0.1, "lam": 0.0},
           "weighted_sum": {}, "della": {}, "model_stock": {}, "add_difference": {}}


def _cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)   # worker processes, once they have exited
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _version() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "lib_merge"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return rev + ("+dirty(lib_merge)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_case(method: str, base: str, models: list[str], repeats: int, processes: int | None,
             out_dir: str, workers: int | None = None, memory: bool = False) -> dict:
    from lib_merge import MergeRecipe, merge_to_file, merge_to_memory
    recipe = MergeRecipe(method, base, models, **PRESETS.get(method, {}))
    outs = {False: os.path.join(out_dir, "off.safetensors"), True: os.path.join(out_dir, "on.safetensors")}
    states: dict = {}

    def one(stats: bool) -> tuple[float, float]:
        cpu = _cpu_seconds()
        started = time.perf_counter()
        if memory:   # the merge's own work only: no output file, no fsync
            states[stats] = merge_to_memory(recipe, "fp16", device="cpu", workers=workers, stats=stats)[0]
        else:
            merge_to_file(recipe, outs[stats], device="cpu", overwrite=True, processes=processes, workers=workers,
                          stats=stats)
        return time.perf_counter() - started, _cpu_seconds() - cpu

    import torch
    one(False)   # warm-up: page cache, input hashes, imports
    one(True)
    identical = (all(torch.equal(states[False][k], states[True][k]) for k in states[False]) if memory
                 else filecmp.cmp(outs[False], outs[True], shallow=False))
    states.clear()
    wall = {False: [], True: []}
    cpu = {False: [], True: []}
    for i in range(repeats):
        for stats in ((False, True) if i % 2 == 0 else (True, False)):
            w, c = one(stats)
            wall[stats].append(w)
            cpu[stats].append(c)
        print(f"  {method} pair {i + 1}: off {wall[False][-1]:.2f} s ({cpu[False][-1]:.2f} CPU s), "
              f"on {wall[True][-1]:.2f} s ({cpu[True][-1]:.2f} CPU s)", flush=True)
    return {
        "method": method, "knobs": PRESETS.get(method, {}), "identical": identical,
        "off_best": min(wall[False]), "on_best": min(wall[True]),
        "ratio_best": min(wall[True]) / min(wall[False]),
        "ratio_median": statistics.median(on / off for on, off in zip(wall[True], wall[False])),
        "cpu_off_best": min(cpu[False]), "cpu_on_best": min(cpu[True]),
        "cpu_ratio_best": min(cpu[True]) / min(cpu[False]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sd1", choices=["sd1", "sd2", "sdxl"])
    ap.add_argument("--n", type=int, default=3, help="models merged into the base")
    ap.add_argument("--scale-down", type=int, default=8, help="1 = full size (2.1 GB a file for SD1)")
    ap.add_argument("--methods", default="ties,dare_ties,weighted_sum", help=f"comma-separated: {', '.join(PRESETS)}")
    ap.add_argument("--repeats", type=int, default=3, help="off/on pairs per method (after one warm-up each)")
    ap.add_argument("--processes", type=int, default=None, help="merge processes (default: one per core)")
    ap.add_argument("--workers", type=int, default=None,
                    help="threads of a one-process merge (with --processes 1; 1 = single-threaded, the steadiest "
                         "CPU-time figure on a loaded machine)")
    ap.add_argument("--memory", action="store_true",
                    help="merge into memory (merge_to_memory): the merge's own work without writing a file, "
                         "the strictest ratio")
    ap.add_argument("--results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()

    os.environ.setdefault("DARE_MERGE_CACHE", os.path.join(tempfile.gettempdir(), "dare-bench-hashes"))
    import torch
    from make_inputs import ensure_inputs

    if args.workers == 1:
        torch.set_num_threads(1)   # single-threaded: no intra-op threads either
    base, models = ensure_inputs(args.arch, args.n, args.scale_down)
    size_mb = sum(os.path.getsize(p) for p in [base, *models]) / 1e6
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-stats-", dir=os.path.dirname(base)) as out_dir:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            rows.append(run_case(method, base, models, args.repeats, args.processes, out_dir, args.workers,
                                 args.memory))
    load_after = os.getloadavg()
    command = " ".join(["python", "benchmarks/bench_stats.py", *sys.argv[1:]])
    target = ("fp16 state dict via merge_to_memory" if args.memory
              else f"output fp16 via merge_to_file (processes: {args.processes or 'one per core'})")
    if args.workers:
        target += f", {args.workers} thread{'s' if args.workers > 1 else ''}"
    lines = [
        f"## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC · merge statistics off vs on · "
        f"{args.arch.upper()} /{args.scale_down} · N = {args.n}" + (" · in memory" if args.memory else ""),
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}, "
        f"ours {_version()}. Inputs {size_mb:,.0f} MB (base + {args.n}), {target}. Load average (1 min) "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after; other engineers share this machine.",
        "",
        "| method | off best s | on best s | on/off (best) | on/off (median of pairs) | CPU off s | CPU on s "
        "| CPU on/off | same bytes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        knobs = " ".join(f"{k}={v}" for k, v in r["knobs"].items())
        lines.append(f"| {r['method']} {knobs} | {r['off_best']:.2f} | {r['on_best']:.2f} | {r['ratio_best']:.3f} | "
                     f"{r['ratio_median']:.3f} | {r['cpu_off_best']:.2f} | {r['cpu_on_best']:.2f} | "
                     f"{r['cpu_ratio_best']:.3f} | {'yes' if r['identical'] else 'NO'} |")
    lines += ["", f"{args.repeats} off/on pairs per method, alternating order, after one warm-up of each; "
              "target on/off <= 1.10 (issue 13).", ""]
    text = "\n".join(lines)
    print(text)
    if args.results:
        with open(os.path.join(HERE, "RESULTS.md"), "a", encoding="utf-8") as handle:
            handle.write("\n" + text)
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
