"""Merge into a file with several processes on the CPU.

Why processes and not threads: on CPU a key is merged as a sequence of torch
ops on cache-sized chunks, each lasting tens of microseconds, and every op
releases and retakes the GIL.  Two threads doing that on two cores spend
their time handing the GIL to each other: measured on SD1 keys, two threads
merged 1.08x as fast as one, two processes 1.95x.

Each worker process opens the inputs itself (reading through the shared page
cache, one chunk at a time) and writes the keys it merged straight into the
temporary output file at their offsets, so no tensor crosses a process
boundary; the parent merges keys too, hands out groups of keys, reports
progress, and is the only one that names, commits or deletes the file.
Workers are plain ``python -c`` children talking JSON lines over pipes, not
``multiprocessing`` children: spawning those re-imports the parent's
``__main__``, which inside the WebUI is the WebUI's launcher.
"""
from __future__ import annotations

import base64
import collections
import hashlib
import json
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from typing import Callable

import torch

from . import errors
from .engine import CancelToken, KeyMerger, MergePlan, Progress, compute_task
from .writer import OUTPUT_TORCH_DTYPES, SafetensorsWriter, open_for_placing, pwrite_all, tensor_bytes, write_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUP_BYTES = 16 << 20          # a worker is handed consecutive keys of about this many output bytes
MIN_PARALLEL_BYTES = 64 << 20   # below this, starting a worker costs more than it saves
IN_FLIGHT = 2                   # groups queued per worker, so it never waits for the parent


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; os.cpu_count() where that is unknown)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores)


def default_processes() -> int:
    """One process per core this process may run on (at most 8)."""
    return min(usable_cores(), 8)


def check_processes(processes: object) -> tuple[int, str | None]:
    """``processes`` capped at the core count, and a note when it was capped; 0, negatives refused.

    More processes than cores only take turns on them: 12 workers on 2 cores
    were measured 13x slower, holding 3.2 GB.
    """
    if isinstance(processes, bool) or not isinstance(processes, int):
        raise errors.ParameterError(f"processes must be a whole number of at least 1, got {processes!r}")
    if processes < 1:
        raise errors.ParameterError(f"processes must be at least 1, got {processes}")
    cores = usable_cores()
    if processes > cores:
        return cores, (f"{processes} processes asked for, {cores} used: one per CPU core this process may use "
                       "(more would only take turns on them)")
    return processes, None


def worth_parallel(plan: MergePlan, processes: int) -> bool:
    total = sum(t.nbytes for t in plan.tasks)
    return processes > 1 and total >= MIN_PARALLEL_BYTES


def plan_fingerprint(plan: MergePlan) -> str:
    """Keys, actions and shapes of a plan: parent and workers must agree on every index."""
    text = "\n".join(f"{t.key}|{t.action}|{tuple(t.shape)}|{t.dtype}|{t.models}" for t in plan.tasks)
    return hashlib.sha256(text.encode()).hexdigest()


def _groups(plan: MergePlan) -> collections.deque:
    groups: collections.deque = collections.deque()
    current: list[int] = []
    size = 0
    for index, task in enumerate(plan.tasks):
        current.append(index)
        size += task.nbytes
        if size >= GROUP_BYTES:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups


def merge_group(plan: MergePlan, merger: KeyMerger, group: list[int], fd: int, offsets: list[int],
                cancel: CancelToken | None) -> list[str]:
    """Merge a group of keys and write each at its file offset; the NaN/Inf notes it added to the report."""
    nonfinite_before = len(plan.report.nonfinite)
    for index in group:
        tensor = compute_task(plan, merger, index, cancel, own_memory=False)
        pwrite_all(fd, tensor_bytes(tensor), offsets[index])
    return plan.report.nonfinite[nonfinite_before:]


class _Worker:
    """One child process and the thread that reads its messages."""

    def __init__(self, ident: int, setup: dict, inbox: "queue.Queue[tuple[int, dict | None]]") -> None:
        self.ident = ident
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]))
        code = "from lib_merge.parallel import worker_main; worker_main()"
        self.process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env, cwd=ROOT)
        self.outstanding = 0
        self._inbox = inbox
        self._send({"setup": base64.b64encode(pickle.dumps(setup)).decode()})
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"dare-merge-worker-{ident}")
        self._reader.start()

    def _send(self, message: dict) -> None:
        try:
            self.process.stdin.write((json.dumps(message) + "\n").encode())
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the reader reports the exit

    def give(self, group: list[int]) -> None:
        self.outstanding += 1
        self._send({"keys": group})

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                self._inbox.put((self.ident, json.loads(line)))
            except ValueError:
                continue
        self._inbox.put((self.ident, None))  # end of output: exited

    def stop(self, graceful: bool) -> None:
        """Close its stdin (an idle worker then exits); kill it unless graceful or it does not exit."""
        try:
            self.process.stdin.close()
        except OSError:
            pass
        if graceful:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        try:
            self.process.stdout.close()
        except OSError:
            pass


def write_parallel(plan: MergePlan, writer: SafetensorsWriter, processes: int,
                   progress: Callable[[Progress], None] | None = None, cancel: CancelToken | None = None,
                   chunk: int | None = None) -> None:
    """Merge every key of ``plan`` into ``writer`` with ``processes`` processes (this one included)."""
    processes, _ = check_processes(processes)
    report = plan.report
    report.device = "cpu"
    started = time.perf_counter()
    total_bytes = sum(t.nbytes for t in plan.tasks)
    groups = _groups(plan)
    setup = {"recipe": plan.recipe, "out_dtype": plan.out_dtype, "temp_path": writer.temp_path, "out_path": writer.path,
             "offsets": writer.file_offsets(), "chunk": chunk, "fingerprint": plan_fingerprint(plan),
             "stats": plan.stats is not None}
    inbox: queue.Queue = queue.Queue()
    workers: list[_Worker] = []
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    merger = KeyMerger(plan, "cpu", chunk)
    done_keys = 0
    done_bytes = 0

    def finished(indices: list[int], nonfinite: list[str], stats: dict | None = None) -> None:
        nonlocal done_keys, done_bytes
        if stats and plan.stats is not None:   # a worker's statistics of these keys
            plan.stats.add_sums(stats)
        for index in indices:
            task = plan.tasks[index]
            writer.mark_placed(index)
            if task.action == "copy":
                report.copied += 1
            else:
                report.merged += 1
            done_keys += 1
            done_bytes += task.nbytes
        for message in nonfinite:
            if message not in report.nonfinite:
                report.nonfinite.append(message)
        if progress is not None and indices:
            progress(Progress(done_keys, len(plan.tasks), done_bytes, total_bytes,
                              plan.tasks[indices[-1]].key, time.perf_counter() - started))

    def feed(worker: _Worker) -> None:
        while worker.outstanding < IN_FLIGHT and groups:
            worker.give(groups.pop())   # workers take from the end, the parent from the front

    def drain(block: bool) -> None:
        while True:
            try:
                ident, message = inbox.get(timeout=0.2) if block else inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            worker = workers[ident]
            if message is None:
                code = worker.process.wait()
                raise errors.MergeError(f"a merge worker process exited unexpectedly (exit code {code}); "
                                        "nothing was saved")
            if "error" in message:
                raise errors.rebuild(message["error"])
            if "done" in message:
                worker.outstanding -= 1
                finished(message["done"], message.get("nonfinite", []), message.get("stats"))
            feed(worker)

    success = False
    try:
        for ident in range(processes - 1):
            workers.append(_Worker(ident, setup, inbox))
            feed(workers[-1])
        fd = open_for_placing(writer.temp_path)
        try:
            while groups:
                if cancel is not None:
                    cancel.check()
                drain(block=False)
                if not groups:
                    break
                group = groups.popleft()
                finished(group, merge_group(plan, merger, group, fd, setup["offsets"], cancel))
        finally:
            os.close(fd)
        while any(w.outstanding for w in workers):
            if cancel is not None:
                cancel.check()
            drain(block=True)
        success = True
    except OSError as exc:
        writer.abort()
        raise write_error(exc, writer.path) from exc
    finally:
        for worker in workers:
            worker.stop(graceful=success)
        torch.set_num_threads(threads_before)
    report.seconds = time.perf_counter() - started
    if plan.stats is not None:
        report.stats = plan.stats.to_dict(plan.recipe)


# ----------------------------------------------------------------------------- the child side

class _ParentGone(Exception):
    """The parent closed the pipe (it was killed): the worker leaves without a word."""


def _watch_parent(parent: int) -> None:
    """Leave as soon as the parent is gone (killed, OOM-killed) instead of merging for nobody."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


def worker_main() -> None:
    """Entry point of a worker process: merge the key groups read from stdin, write them at their offsets."""
    out = sys.stdout
    sys.stdout = sys.stderr   # nothing but protocol lines on the pipe
    torch.set_num_threads(1)
    try:
        import signal
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the parent, which stops the workers
    except (ImportError, ValueError, OSError):
        pass
    if os.name != "nt":
        threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True,
                         name="dare-merge-parent-watch").start()

    def say(message: dict) -> None:
        try:
            out.write(json.dumps(message) + "\n")
            out.flush()
        except (OSError, ValueError):   # BrokenPipeError: nobody reads any more
            raise _ParentGone from None

    plan = None
    fd = None
    setup = None
    parent_gone = False
    try:
        lines = iter(sys.stdin.buffer.readline, b"")
        setup = pickle.loads(base64.b64decode(json.loads(next(lines))["setup"]))
        plan = MergePlan(setup["recipe"], _dtype_name(setup["out_dtype"]), stats=bool(setup.get("stats")))
        if plan_fingerprint(plan) != setup["fingerprint"]:
            raise errors.MergeError("internal: a worker process planned the merge differently")
        merger = KeyMerger(plan, "cpu", setup["chunk"])
        fd = open_for_placing(setup["temp_path"])
        for line in lines:
            group = json.loads(line)["keys"]
            nonfinite = merge_group(plan, merger, group, fd, setup["offsets"], None)
            say({"done": group, "nonfinite": nonfinite, "stats": plan.stats.take() if plan.stats is not None else None})
    except _ParentGone:
        parent_gone = True
    except BaseException as exc:  # every failure goes back to the parent, which reports it
        if isinstance(exc, OSError) and setup is not None:
            exc = write_error(exc, setup["out_path"])
        try:
            if isinstance(exc, errors.MergeError):
                say({"error": errors.describe(exc)})
            else:
                say({"error": {"type": "MergeError",
                               "message": f"merge worker failed: {type(exc).__name__}: {exc}",
                               "path": None, "key": None}})
        except _ParentGone:
            parent_gone = True
    finally:
        if fd is not None:
            os.close(fd)
        if plan is not None:
            plan.close()
    if parent_gone:
        os._exit(0)   # not sys.exit: flushing the broken pipe at shutdown would print a traceback


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in OUTPUT_TORCH_DTYPES.items() if value == dtype)
