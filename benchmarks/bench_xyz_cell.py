"""One X/Y/Z cell: re-merge from the input cache vs a merge from disk, SD1-shaped.

Each cell is what the XYZ script does per grid cell: ``MergeSession.merge``
(plan, merge into memory, input hashes; no hot-load) of the same inputs with a
different p.  "disk" opens the files afresh (memory maps, as without a cache);
"cache" reads them through :class:`lib_merge.input_cache.InputCache`, filled by
one earlier cell.  The two alternate, and the figure is the median of each and
the median ratio (see benchmarks/README.md, "What is measured").  ``--cold`` evicts the
inputs from the page cache before every disk cell (posix_fadvise DONTNEED),
which is what a disk merge costs once the inputs no longer fit in the page
cache (SDXL with several models); without it the disk cells read warm pages.

    python benchmarks/bench_xyz_cell.py                          # full-size SD1, 2 models, CPU
    python benchmarks/bench_xyz_cell.py --scale-down 8 --repeats 5
    python benchmarks/bench_xyz_cell.py --device cuda --gpu-mb 20000   # on a GPU machine
    python benchmarks/bench_xyz_cell.py --arch sdxl --n 2 --device cuda --gpu-mb 40000
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)


def _evict(paths: list[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sd1", choices=["sd1", "sd2", "sdxl"])
    ap.add_argument("--n", type=int, default=2, help="models merged into the base")
    ap.add_argument("--scale-down", type=int, default=1, help="1 = full size (2.1 GB a file for SD1)")
    ap.add_argument("--method", default="dare_ties_soup")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp16", help="precision of the merged state (the session's dtype)")
    ap.add_argument("--gpu-mb", type=float, default=0, help="device budget of the cache (cuda only)")
    ap.add_argument("--ram-mb", type=float, default=32768, help="RAM budget of the cache")
    ap.add_argument("--repeats", type=int, default=3, help="disk/cache cell pairs")
    ap.add_argument("--cold", action="store_true", help="evict the inputs from the page cache before disk cells")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    os.environ.setdefault("DARE_MERGE_CACHE", os.path.join(tempfile.gettempdir(), "dare-bench-hashes"))
    import torch

    from lib_merge import MergeRecipe
    from lib_merge.input_cache import InputCache, session_reads_from
    from lib_merge.session import MergeSession
    from make_inputs import ensure_inputs

    base, models = ensure_inputs(args.arch, args.n, args.scale_down)
    inputs = [base, *models]
    size_gb = sum(os.path.getsize(p) for p in inputs) / 1e9
    session = MergeSession(os.path.dirname(base), device=args.device)
    cache = InputCache(args.device, device_budget_mb=args.gpu_mb, ram_budget_mb=args.ram_mb)
    p_values = iter([round(0.1 + 0.05 * i, 2) for i in range(4 * args.repeats + 4)])

    def recipe() -> MergeRecipe:
        return MergeRecipe(args.method, base, models, p=next(p_values))

    def sync() -> None:
        if torch.device(args.device).type == "cuda":
            torch.cuda.synchronize()

    def disk_cell() -> float:
        if args.cold:
            _evict(inputs)
        r = recipe()
        sync()
        started = time.perf_counter()
        session.merge(r, dtype=args.dtype, hot_load=False)
        sync()
        return time.perf_counter() - started

    def cache_cell() -> float:
        r = recipe()
        sync()
        started = time.perf_counter()
        cache.prepare_recipe(r)
        with session_reads_from(session, cache):
            session.merge(r, dtype=args.dtype, hot_load=False, inputs=cache.input_hashes(r.base, r.models))
        sync()
        return time.perf_counter() - started

    # Warm-up: hash the inputs once (the WebUI has their hashes already) and touch the pages.
    from lib_merge.api import input_hashes
    input_hashes(MergeRecipe(args.method, base, models))
    fill = cache_cell()
    stats_after_fill = cache.stats().as_dict()
    disk, cached = [], []
    for i in range(args.repeats):
        order = (disk_cell, cache_cell) if i % 2 == 0 else (cache_cell, disk_cell)
        for fn in order:
            (disk if fn is disk_cell else cached).append(fn())
        print(f"pair {i + 1}: disk {disk[-1]:.2f} s, cache {cached[-1]:.2f} s", flush=True)
    ratios = [d / c for d, c in zip(disk, cached)]
    result = {
        "arch": args.arch, "n_models": args.n, "scale_down": args.scale_down, "method": args.method,
        "device": args.device, "device_name": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                                               else f"cpu x{os.cpu_count()} (torch threads {torch.get_num_threads()})"),
        "inputs_gb": round(size_gb, 2), "cold_disk": args.cold,
        "first_cell_fills_cache_s": round(fill, 3),
        "disk_cell_s": [round(x, 3) for x in disk], "cache_cell_s": [round(x, 3) for x in cached],
        "disk_median_s": round(statistics.median(disk), 3), "cache_median_s": round(statistics.median(cached), 3),
        "median_ratio_disk_over_cache": round(statistics.median(ratios), 3),
        "cache": stats_after_fill, "rss_anon_mb": round(_rss_anon_mb()),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
