"""Where our merge spends its time: one job under cProfile (main thread) or py-spy (all threads).

cProfile attributes every torch op to the lib_merge function that called it,
which is what matters for tuning; py-spy (installed by setup_mecha.sh) also
sees the input-hashing thread and native frames.

    benchmarks/.venv-mecha/bin/python benchmarks/profile_ours.py --job ties --n 3
    benchmarks/.venv-mecha/bin/python benchmarks/profile_ours.py --job dare_ties --py-spy
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import io
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import jobs as jobs_mod  # noqa: E402
from make_inputs import WORK, ensure_inputs  # noqa: E402


def _cprofile(job: jobs_mod.Job, base: str, models: list[str], out: str, top: int) -> str:
    from lib_merge import MergeRecipe, merge_to_file

    kw = {} if job.method == "weighted_sum" else {"p": job.p, "k": job.k, "lam": job.lam,
                                                    "vote_sgn": job.vote_sgn or None}
    recipe = MergeRecipe(job.method, base, models, alpha=job.alpha, seed=jobs_mod.SEED, vae="merge", **kw)
    prof = cProfile.Profile()
    started = time.perf_counter()
    prof.enable()
    report = merge_to_file(recipe, out, "fp16", overwrite=True, device="cpu")
    prof.disable()
    wall = time.perf_counter() - started
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    buf.write(f"{report.summary()}\nwall {wall:.1f} s (main thread profiled; the input hashing runs beside it)\n")
    buf.write("\n== by own time (tottime)\n")
    stats.sort_stats("tottime").print_stats(top)
    buf.write("\n== lib_merge functions by cumulative time\n")
    stats.sort_stats("cumulative").print_stats(r"lib_merge", top)
    return buf.getvalue()


def _pyspy(job: jobs_mod.Job, base: str, models: list[str], out: str, top: int) -> str:
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        spy = shutil.which("py-spy") or "py-spy"
    raw = out + ".collapsed.txt"
    cmd = [spy, "record", "--format", "raw", "--threads", "--rate", "20", "-o", raw, "--",
           *jobs_mod.ours_cmd(sys.executable, job, base, models, out, "cpu"), "--overwrite"]
    subprocess.run(cmd, env=jobs_mod.ours_env(tempfile.mkdtemp(prefix="hc-", dir=WORK)), check=True, cwd=ROOT)
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    with open(raw, encoding="utf-8") as handle:
        for line in handle:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            n = int(count)
            total += n
            frames = stack.split(";")
            own[frames[-1]] += n
            for f in {f for f in frames if "lib_merge" in f or "thread" in f.lower()}:
                incl[f] += n
    lines = [f"{total} samples"]
    lines.append("== innermost frame (own time)")
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append("== lib_merge frames and threads (inclusive)")
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", choices=list(jobs_mod.BASE_JOBS), default="ties")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--arch", choices=["sd1", "sdxl"], default="sd1")
    ap.add_argument("--scale-down", type=int, default=1)
    ap.add_argument("--py-spy", action="store_true", help="sample all threads with py-spy instead of cProfile")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    job = replace(jobs_mod.BASE_JOBS[a.job], n=a.n)
    base, models = ensure_inputs(a.arch, a.n, a.scale_down)
    out_dir = os.path.join(WORK, "out")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, "profile.safetensors")
    os.environ["DARE_MERGE_CACHE"] = tempfile.mkdtemp(prefix="hc-", dir=WORK)
    try:
        text = (_pyspy if a.py_spy else _cprofile)(job, base, models, out, a.top)
    finally:
        for path in (out,):
            if os.path.exists(path):
                os.remove(path)
        shutil.rmtree(os.environ["DARE_MERGE_CACHE"], ignore_errors=True)
    print(f"{job.label}, N={job.n}, load average {os.getloadavg()[0]:.1f}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
