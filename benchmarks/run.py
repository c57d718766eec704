"""Side-by-side benchmark: I/O floor vs our merge vs sd-mecha 1.1.8, same inputs, same run.

For every job the three are run alternately (floor, ours, sd-mecha, floor,
ours, ...) after the inputs' pages have been read once, and the median of
each is taken; shared machines are noisy, so the ratios in one run are what
mean something (see benchmarks/README.md, "What is measured").  Every process is measured
the same way (benchmarks/measure.py): wall time from spawn to a durable
output file (the harness fsyncs it after exit if the tool did not), peak
RssAnon sampled every 50 ms, and the kernel's peak RSS (VmHWM).

    bash benchmarks/setup_mecha.sh
    benchmarks/.venv-mecha/bin/python benchmarks/run.py                # SD1, all jobs, N sweep
    benchmarks/.venv-mecha/bin/python benchmarks/run.py --jobs ties --n-list 3 --repeats 3 --check
    python benchmarks/run.py --device cuda --skip-mecha                # on a GPU machine

The table (with date, machine, versions, load and the exact command) is
printed and appended to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import signal
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import jobs as jobs_mod  # noqa: E402
import measure  # noqa: E402
from make_inputs import MAX_MODELS, WORK, ensure_inputs  # noqa: E402

MECHA_PY = os.path.join(HERE, ".venv-mecha", "bin", "python")
RESULTS = os.path.join(HERE, "RESULTS.md")
CHECK_JOBS = ("weighted_sum", "ties")   # no randomness: both tools must agree to fp16 rounding


# ----------------------------------------------------------------------------- machine and versions

def machine_info() -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "?")
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return {"nproc": os.cpu_count(), "ram_gib": round(mem_gib, 1), "cpu": cpu, "host": platform.node(),
            "kernel": platform.release()}


def _py_out(python: str, code: str, env: dict | None = None) -> str:
    try:
        return subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=600,
                              env=env).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def ours_version() -> str:
    """Commit of the checkout, marked dirty when lib_merge has uncommitted edits (they are what ran)."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty(lib_merge)" if git("status", "--porcelain", "--", "lib_merge") else "")


def gpu_name(python: str) -> str:
    return _py_out(python, "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() "
                           "else 'no CUDA')")


# ----------------------------------------------------------------------------- one job

@dataclass
class JobResult:
    job: jobs_mod.Job
    floor: list[measure.Measurement] = field(default_factory=list)
    ours: list[measure.Measurement] = field(default_factory=list)
    mecha: list[measure.Measurement] = field(default_factory=list)
    check: dict | None = None
    kernel: dict | None = None
    load_before: float = 0.0
    errors: list[str] = field(default_factory=list)


def warm_cache(paths: list[str]) -> float:
    """Read every input once so floor, ours and sd-mecha all start from the same page-cache state."""
    started = time.perf_counter()
    buf = bytearray(16 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buf):
                pass
    return time.perf_counter() - started


def _median(ms: list[measure.Measurement], attr: str) -> float | None:
    vals = [getattr(m, attr) for m in ms if m.returncode == 0]
    return statistics.median(vals) if vals else None


def _rm(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def prime_hash_cache(python: str, env: dict, paths: list[str]) -> None:
    code = ("import sys; from lib_merge.hashing import sha256_file\n"
            "for p in sys.argv[1:]: sha256_file(p)")
    subprocess.run([python, "-c", code, *paths], env=env, check=True)


def run_job(job: jobs_mod.Job, base: str, models: list[str], a: argparse.Namespace, out_dir: str,
            log_dir: str) -> JobResult:
    res = JobResult(job, load_before=os.getloadavg()[0])
    inputs = [base, *models]
    out_bytes = os.path.getsize(base)   # the merged fp16 file has the base's keys, shapes and dtypes
    floor_out = os.path.join(out_dir, "floor.bin")
    ours_out = os.path.join(out_dir, "ours.safetensors")
    mecha_out = os.path.join(out_dir, "mecha.safetensors")
    tag = f"{job.name}-n{job.n}"
    print(f"\n== {job.label}, N={job.n}: warming the page cache ({sum(map(os.path.getsize, inputs)) / 1e9:.1f} GB)",
          flush=True)
    print(f"   warm read took {warm_cache(inputs):.1f} s; load average {os.getloadavg()[0]:.2f}", flush=True)
    hash_root = os.path.join(out_dir, "hash-cache")
    if a.hash_cache == "warm":
        shutil.rmtree(hash_root, ignore_errors=True)
        prime_hash_cache(a.ours_python, jobs_mod.ours_env(hash_root), inputs)
    ours_cmd = jobs_mod.ours_cmd(a.ours_python, job, base, models, ours_out, a.device)
    mecha_cmd = jobs_mod.mecha_cmd(a.mecha_python, job, base, models, mecha_out)
    if a.mecha_threads is not None:
        mecha_cmd += ["--threads", str(a.mecha_threads)]
    floor_cmd = [a.ours_python, os.path.join(HERE, "io_floor.py"), "--inputs", *inputs, "--out", floor_out,
                 "--out-bytes", str(out_bytes)]
    print(f"   ours:  {shlex.join(ours_cmd)}")
    if not a.skip_mecha:
        print(f"   mecha: {shlex.join(mecha_cmd)}")
    last = a.repeats - 1
    for rep in range(a.repeats):
        _rm(floor_out)
        m = measure.run(floor_cmd, output=None, log_path=os.path.join(log_dir, f"{tag}-floor-{rep}.log"))
        _rm(floor_out)
        _report("floor", m, res.floor, res.errors)

        _rm(ours_out)
        if a.hash_cache == "cold":
            shutil.rmtree(hash_root, ignore_errors=True)
        m = measure.run(ours_cmd, env=jobs_mod.ours_env(hash_root), output=ours_out,
                        log_path=os.path.join(log_dir, f"{tag}-ours-{rep}.log"), cwd=ROOT)
        _report("ours", m, res.ours, res.errors)
        keep = a.check and rep == last and job.name in CHECK_JOBS and not a.skip_mecha
        if not keep:
            _rm(ours_out)

        if not a.skip_mecha:
            _rm(mecha_out)
            m = measure.run(mecha_cmd, output=mecha_out, log_path=os.path.join(log_dir, f"{tag}-mecha-{rep}.log"))
            _report("sd-mecha", m, res.mecha, res.errors)
            if not keep:
                _rm(mecha_out)
        if keep and os.path.exists(ours_out) and os.path.exists(mecha_out):
            from compare import compare
            res.check = compare(ours_out, mecha_out)
            print(f"   check vs sd-mecha: {json.dumps(res.check)}", flush=True)
            if res.check["worst_in_fp16_steps"] > 1.0:
                res.errors.append(f"check: ours and sd-mecha differ by {res.check['worst_in_fp16_steps']} fp16 "
                                  f"steps at {res.check['worst_key']}")
            _rm(ours_out)
            _rm(mecha_out)
    if a.kernel_time:
        res.kernel = kernel_time(job, base, models, a, log_dir)
    return res


def _report(what: str, m: measure.Measurement, into: list, errors: list[str]) -> None:
    into.append(m)
    if m.returncode != 0:
        errors.append(f"{what} failed (exit {m.returncode}): {m.output_tail.strip().splitlines()[-1:]}")
        print(f"   {what:8s} FAILED exit {m.returncode}\n{m.output_tail[-2000:]}", flush=True)
        return
    print(f"   {what:8s} {m.seconds:7.1f} s  CPU {m.cpu_seconds:7.1f} s  RssAnon {m.peak_rss_anon_mb:7.0f} MB  VmHWM {m.hwm_mb:7.0f} MB"
          + (f"  (+{m.fsync_seconds:.1f} s fsync after exit)" if m.fsync_seconds > 0.05 else ""), flush=True)


def kernel_time(job: jobs_mod.Job, base: str, models: list[str], a: argparse.Namespace, log_dir: str) -> dict | None:
    cmd = [a.ours_python, os.path.join(HERE, "kernel_time.py"), "--job", json.dumps(jobs_mod.job_dict(job)),
           "--base", base, "--models", *models, "--device", a.device]
    env = jobs_mod.ours_env(tempfile.mkdtemp(prefix="hc-", dir=WORK))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    with open(os.path.join(log_dir, f"{job.name}-n{job.n}-kernel.log"), "w", encoding="utf-8") as handle:
        handle.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(f"   kernel timing failed:\n{proc.stderr[-2000:]}", flush=True)
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"   kernel-only time: {json.dumps(result)}", flush=True)
    return result


# ----------------------------------------------------------------------------- the table

def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def table(results: list[JobResult], skip_mecha: bool) -> str:
    head = ["job", "N", "floor s", "ours s", "mecha s", "ours/floor", "mecha/ours",
            "ours peak RssAnon MB", "mecha peak RssAnon MB", "ours VmHWM MB", "mecha VmHWM MB",
            "floor CPU s", "ours CPU s", "mecha CPU s", "mecha/ours CPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        f, o, m = (_median(r.floor, "seconds"), _median(r.ours, "seconds"),
                   None if skip_mecha else _median(r.mecha, "seconds"))
        row = [r.job.label, str(r.job.n), _fmt(f), _fmt(o), _fmt(m), _ratio(o, f), _ratio(m, o),
               _fmt(_median(r.ours, "peak_rss_anon_mb"), 0), _fmt(_median(r.mecha, "peak_rss_anon_mb"), 0),
               _fmt(_median(r.ours, "hwm_mb"), 0), _fmt(_median(r.mecha, "hwm_mb"), 0),
               _fmt(_median(r.floor, "cpu_seconds")), _fmt(_median(r.ours, "cpu_seconds")),
               _fmt(_median(r.mecha, "cpu_seconds")),
               _ratio(_median(r.mecha, "cpu_seconds"), _median(r.ours, "cpu_seconds"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def report_text(results: list[JobResult], a: argparse.Namespace, info: dict, command: str,
                started: dt.datetime, load_start: tuple | None, load_end: tuple | None,
                interrupted: str | None = None) -> str:
    reps = max((len(r.ours) for r in results), default=a.repeats)
    out = [f"## {started:%Y-%m-%d %H:%M} UTC · {a.arch.upper()} · {a.device} · repeats {reps}", "",
           f"Command: `{command}`", "",
           f"Machine: {info['machine']['nproc']} CPUs ({info['machine']['cpu']}), {info['machine']['ram_gib']} GiB RAM, "
           f"Linux {info['machine']['kernel']}" + (f", GPU {info['gpu']}" if a.device == "cuda" else "") + ".",
           f"Versions: torch {info['torch']}, sd-mecha {info['mecha']}, ours {info['ours']}, "
           f"Python {platform.python_version()}.",
           (f"Load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in load_start)}, "
            f"at end {'/'.join(f'{x:.2f}' for x in load_end)}; other engineers share this machine."
            if load_start and load_end else "Other engineers share this machine; see the load before each job."),
           interrupted,
           f"Hash cache of our merge: {a.hash_cache} (cold = our CLI also sha256-hashes every input for the "
           f"recipe metadata, on a side thread)." if a.hash_cache else "",
           "", table(results, a.skip_mecha), ""]
    per_job_load = ", ".join(f"{r.job.name} N={r.job.n}: {r.load_before:.1f}" for r in results)
    out.append(f"Load average (1 min) before each job: {per_job_load}.")
    checks = [r for r in results if r.check]
    if checks:
        out += ["", "Cross-check against sd-mecha (same maths, no randomness; fp16 outputs; UNet + text encoder "
                "+ VAE keys, other keys apart):", ""]
        for r in checks:
            c = r.check
            line = (f"- {r.job.label}, N={r.job.n}: max |ours − sd-mecha| = {c['max_abs_diff']:.3g} "
                    f"({c['worst_in_fp16_steps']} fp16 steps, at {c['worst_key']}); "
                    f"{c['elements_differing']} of {c['elements']} elements differ, in "
                    f"{c['keys_differing']} of {c['keys_compared']} keys")
            other = c.get("by_component", {}).get("other")
            if other and other["max_abs_diff"] > 0:
                line += (f". Other keys: max diff {other['max_abs_diff']:.3g} at {other['worst_key']} "
                         f"(ours, sd-mecha = {other.get('worst_values')})")
            out.append(line)
    kernels = [r for r in results if r.kernel]
    if kernels:
        out += ["", "Kernel-only time (inputs already on the device, synchronised):", ""]
        for r in kernels:
            out.append(f"- {r.job.label}, N={r.job.n}: {json.dumps(r.kernel)}")
    errors = [f"- {r.job.label}, N={r.job.n}: {e}" for r in results for e in r.errors]
    if errors:
        out += ["", "Failures:", "", *errors]
    out += ["", "Times: median wall seconds from process start to a durable (fsynced) output; floor = read every "
            "input tensor with safetensors + write and fsync one output of the result's size. CPU s = user + system "
            "time of the process (all threads), the figure to trust when the machine is loaded. Memory: peak "
            "RssAnon sampled every 50 ms (targets are on this); VmHWM also counts touched pages of the "
            "memory-mapped inputs.", ""]
    return "\n".join(x for x in out if x is not None)


def results_from_log(path: str) -> tuple[list[JobResult], dict, str | None]:
    """Rebuild the results of a run from its console log (a run that was stopped before its table)."""
    import re

    by_label = {j.label: j for j in jobs_mod.BASE_JOBS.values()}
    line_re = re.compile(r"^\s+(floor|ours|sd-mecha)\s+([\d.]+) s\s+(?:CPU\s+([\d.]+) s\s+)?RssAnon\s+([\d.]+) MB"
                         r"\s+VmHWM\s+([\d.]+) MB")
    results: list[JobResult] = []
    info: dict = {}
    command = None
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith('{"machine"'):
                info = json.loads(line)
            elif line.startswith("command: "):
                command = line[len("command: "):].strip()
            elif line.startswith("== "):
                m = re.match(r"== (.+), N=(\d+):", line)
                job = replace(by_label[m.group(1)], n=int(m.group(2)))
                results.append(JobResult(job))
            elif "load average" in line and results and "warm read" in line:
                results[-1].load_before = float(line.rsplit(" ", 1)[1])
            elif line.strip().startswith("check vs sd-mecha:") and results:
                results[-1].check = json.loads(line.split(":", 1)[1])
            elif (m := line_re.match(line)) and results:
                ms = measure.Measurement(seconds=float(m.group(2)), returncode=0,
                                         peak_rss_anon_mb=float(m.group(4)), peak_rss_mb=0.0,
                                         hwm_mb=float(m.group(5)),
                                         cpu_seconds=float(m.group(3)) if m.group(3) else 0.0)
                getattr(results[-1], {"floor": "floor", "ours": "ours", "sd-mecha": "mecha"}[m.group(1)]).append(ms)
    return results, info, command


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["sd1", "sdxl"], default="sd1",
                    help="sd1 (2.1 GB a file) or sdxl (6.9 GB a file, at most 3 fine-tunes; opt in)")
    ap.add_argument("--jobs", default="weighted_sum,ties,dare_ties,dare_ties_soup",
                    help="comma list of: " + ", ".join(jobs_mod.BASE_JOBS))
    ap.add_argument("--n", type=int, default=3, help="N for the listed jobs (default 3)")
    ap.add_argument("--n-list", default=None,
                    help="extra N values for the dare_ties_soup sweep (default 2,4,8 for SD1, 2 for SDXL); "
                         "'none' for no sweep")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-mecha", action="store_true", help="no sd-mecha (e.g. on a GPU machine without it)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--check", action="store_true",
                    help="compare our output with sd-mecha's for weighted_sum and ties (max abs diff)")
    ap.add_argument("--kernel-time", action="store_true",
                    help="also time the kernels alone on device-resident inputs (default on with --device cuda)")
    ap.add_argument("--hash-cache", choices=["cold", "warm"], default="cold",
                    help="cold: our merge starts with an empty input-hash cache (it sha256-hashes every input, "
                         "as on first use); warm: hashes cached beforehand")
    ap.add_argument("--scale-down", type=int, default=1, help="tiny inputs for trying the harness (1 = full size)")
    ap.add_argument("--ours-python", default=sys.executable, help="interpreter for our merge and the floor")
    ap.add_argument("--mecha-python", default=MECHA_PY)
    ap.add_argument("--mecha-threads", type=int, default=None, help="sd-mecha's threads (default: its own choice)")
    ap.add_argument("--results", default=RESULTS, help="markdown file to append to ('-' = do not append)")
    ap.add_argument("--from-log", metavar="LOG", help="write the table of a stopped run from its console log")
    ap.add_argument("--command", help="with --from-log: the command that made the log (for the report)")
    a = ap.parse_args(argv)
    if a.device == "cuda":
        a.kernel_time = True
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.from_log:
        return report_from_log(a)
    command = shlex.join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT) else sys.executable,
                          os.path.relpath(os.path.abspath(__file__), ROOT), *(argv if argv is not None else sys.argv[1:])])
    started = dt.datetime.now(dt.timezone.utc)
    load_start = os.getloadavg()
    job_names = [j.strip() for j in a.jobs.split(",") if j.strip()]
    unknown = [j for j in job_names if j not in jobs_mod.BASE_JOBS]
    if unknown:
        raise SystemExit(f"unknown job(s) {unknown}; choose from {', '.join(jobs_mod.BASE_JOBS)}")
    if a.n_list is None:
        n_list = [2, 4, 8] if a.arch == "sd1" else [2]
    elif a.n_list.strip().lower() == "none":
        n_list = []
    else:
        n_list = [int(x) for x in a.n_list.split(",") if x.strip()]
    todo = jobs_mod.expand(job_names, n_list, a.n)
    max_n = max(j.n for j in todo)
    if max_n > MAX_MODELS[a.arch]:
        raise SystemExit(f"{a.arch}: at most {MAX_MODELS[a.arch]} fine-tunes")
    if not a.skip_mecha and not os.path.exists(a.mecha_python):
        raise SystemExit(f"{a.mecha_python} not found: run `bash benchmarks/setup_mecha.sh` first, or --skip-mecha")

    print(f"inputs: {a.arch}, base + {max_n} fine-tunes, scale_down={a.scale_down} (made once, kept in {WORK})")
    base, models = ensure_inputs(a.arch, max_n, a.scale_down)
    env = jobs_mod.ours_env(tempfile.gettempdir())
    info = {"machine": machine_info(), "ours": ours_version(),
            "torch": _py_out(a.ours_python, "import torch; print(torch.__version__)"),
            "mecha": "not run" if a.skip_mecha else _py_out(
                a.mecha_python, "import importlib.metadata as m; print(m.version('sd-mecha'))"),
            "gpu": gpu_name(a.ours_python) if a.device == "cuda" else None}
    if a.device == "cuda" and info["gpu"] == "no CUDA":
        raise SystemExit("--device cuda but torch sees no CUDA device")
    print(json.dumps(info))
    del env
    run_dir = os.path.join(WORK, "runs", started.strftime("%Y%m%d-%H%M%S"))
    out_dir = os.path.join(WORK, "out")
    os.makedirs(run_dir, exist_ok=True)
    os.makedirs(out_dir, exist_ok=True)
    print(f"command: {command}", flush=True)
    results = []
    signal.signal(signal.SIGTERM, _raise_interrupt)
    interrupted = None
    for job in todo:
        try:
            results.append(run_job(job, base, models[:job.n], a, out_dir, run_dir))
        except KeyboardInterrupt:
            interrupted = f"Interrupted during {job.label}, N={job.n}: {len(results)} of {len(todo)} jobs completed."
            print(f"\n{interrupted}", flush=True)
            break
    text = report_text(results, a, info, command, started, load_start, os.getloadavg(), interrupted)
    print("\n" + text)
    if a.results != "-":
        append_results(a.results, text)
        print(f"appended to {a.results}; logs in {run_dir}")
    return 1 if any(r.errors for r in results) else 0


def report_from_log(a: argparse.Namespace) -> int:
    results, info, command = results_from_log(a.from_log)
    results = [r for r in results if r.floor and r.ours and (a.skip_mecha or r.mecha)]
    started = dt.datetime.fromtimestamp(os.path.getmtime(a.from_log), dt.timezone.utc)
    note = (f"Rebuilt from the console log of a run stopped before its end ({len(results)} complete jobs; "
            "the date above is when the log was last written); load-at-end figures are not in the log.")
    text = report_text(results, a, info, a.command or command or "(not in the log)", started, None, None, note)
    print(text)
    if a.results != "-":
        append_results(a.results, text)
    return 0


def append_results(path: str, text: str) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        if handle.tell() == 0:
            handle.write("# Benchmark results\n\nAppended by `benchmarks/run.py`; see benchmarks/README.md "
                         "for what is measured.\n\n")
        handle.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
