"""The two things callers do with a recipe: merge into memory, or into a file.

The WebUI hot-load, the XYZ cells and the standalone UI call
:func:`merge_to_memory` / :func:`iter_merge`; the CLI and every "Save" call
:func:`merge_to_file`, which writes the recipe and A1111's merge metadata.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch

from .engine import CancelToken, MergePlan, MergeReport, Progress, default_device, iter_merge
from .errors import MergeError
from .parallel import check_processes, default_processes, worth_parallel, write_parallel
from .hashing import legacy_hash, sha256_file, short_hash
from .recipe import RECIPE_METADATA_KEY, MergeRecipe
from .writer import SafetensorsWriter, check_output_target

log = logging.getLogger("lib_merge")

ProgressFn = Callable[[Progress], None]


HASH_THREADS = 4   # files hashed at once; more would only make a spinning disk seek


def _file_hashes(full: str) -> tuple[str, dict]:
    sha = sha256_file(full)
    return full, {"sha256": sha, "hash": short_hash(sha), "legacy_hash": legacy_hash(full)}


def input_hashes(recipe: MergeRecipe) -> dict[str, dict]:
    """sha256, A1111 short hash and legacy hash of every input, keyed by absolute path.

    Files are hashed side by side: hashlib releases the GIL, and on first use
    sha256 of the inputs costs about a second of CPU per GB, so one thread
    would still be hashing long after the merge itself is done.
    """
    paths = list(dict.fromkeys(os.path.abspath(p) for p in [recipe.base, *recipe.models]))
    threads = max(1, min(len(paths), HASH_THREADS, os.cpu_count() or 1))
    if threads == 1:
        return dict(map(_file_hashes, paths))
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dare-merge-hash") as pool:
        return dict(pool.map(_file_hashes, paths))


class _Hasher(threading.Thread):
    """Hash the inputs on the side while the merge runs."""

    def __init__(self, recipe: MergeRecipe) -> None:
        super().__init__(daemon=True)
        self.recipe = recipe
        self.result: dict[str, dict] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = input_hashes(self.recipe)
        except BaseException as exc:  # reported by the caller
            self.error = exc


def build_metadata(recipe: MergeRecipe, inputs: dict[str, dict], out_dtype: str) -> dict[str, str]:
    """The recipe JSON plus A1111's sd_merge_recipe / sd_merge_models (its metadata viewer shows them)."""
    r = recipe.resolved()
    doc = r.to_json_dict(inputs)
    doc["output_dtype"] = out_dtype
    doc["recipe_hash"] = r.recipe_hash(inputs)
    a1111_recipe = {
        "type": "sd-webui-dare-merge", "method": r.method,
        "primary_model_hash": inputs[os.path.abspath(r.base)]["sha256"],
        "secondary_model_hashes": [inputs[os.path.abspath(m)]["sha256"] for m in r.models],
        **{k: v for k, v in r.params_dict().items() if v is not None},
        "save_as_half": out_dtype != "fp32", "output_dtype": out_dtype,
    }
    models = {}
    for path in [r.base, *r.models]:
        info = inputs[os.path.abspath(path)]
        models[info["sha256"]] = {"name": os.path.basename(path), "legacy_hash": info["legacy_hash"],
                                  "sd_merge_recipe": None}
    return {"format": "pt", RECIPE_METADATA_KEY: json.dumps(doc, sort_keys=True),
            "sd_merge_recipe": json.dumps(a1111_recipe, sort_keys=True),
            "sd_merge_models": json.dumps(models, sort_keys=True)}


def merge_to_file(recipe: MergeRecipe, out_path: str, out_dtype: str = "fp16", overwrite: bool = False,
                  device: str | None = None, progress: ProgressFn | None = None,
                  cancel: CancelToken | None = None, chunk: int | None = None,
                  workers: int | None = None, processes: int | None = None,
                  protected_paths: Sequence[str] = (), notify: Callable[[str], None] | None = None,
                  stats: bool = True) -> MergeReport:
    """Merge and write a safetensors file atomically; nothing is left behind on failure.

    On the CPU, a large merge runs in ``processes`` processes (default: one per
    core; 1 = this process only, with ``workers`` threads), see parallel.py.
    The output may never be one of the inputs nor one of ``protected_paths``
    (a WebUI passes the checkpoint it has loaded), with or without
    ``overwrite``.  ``notify`` gets one-line notes as they happen (stale
    temporary files removed); they are in the report's notes as well.
    ``stats``: gather the merge statistics (``report.stats``, the analysis
    JSON's share/kept/elected_agreement); the written bytes are the same either way.
    """
    capped = None
    if processes is not None:
        processes, capped = check_processes(processes)
    inputs = [recipe.base, *recipe.models] if isinstance(recipe.models, (list, tuple)) else [recipe.base]
    out_abs = os.path.abspath(out_path)   # checked before any file is opened or hashed
    check_output_target(out_abs, inputs, "an input of this merge")
    check_output_target(out_abs, protected_paths, "which is protected (the checkpoint loaded now)")
    plan = MergePlan(recipe, out_dtype, stats=stats)
    try:
        if capped:
            plan.report.notes.append(capped)
        device = device or default_device()
        if processes is None:
            processes = default_processes() if workers is None else 1
        use_processes = torch.device(device).type == "cpu" and worth_parallel(plan, processes)

        def note(line: str) -> None:
            plan.report.notes.append(line)   # the summary shows it; a caller may show it at once
            (notify or log.info)(line)

        with SafetensorsWriter(out_path, plan.output_entries(), overwrite=overwrite,
                               protected_paths=[plan.recipe.base, *plan.recipe.models, *protected_paths],
                               notify=note) as writer:
            hasher = _Hasher(plan.recipe)   # started once the output is accepted
            hasher.start()
            if use_processes:
                write_parallel(plan, writer, processes, progress, cancel, chunk)
            else:
                for key, tensor in iter_merge(plan, device, progress, cancel, chunk, workers=workers):
                    writer.write(key, tensor)
            hasher.join()
            if hasher.error is not None:
                raise MergeError(f"could not hash the inputs: {hasher.error}")
            metadata = build_metadata(plan.recipe, hasher.result or {}, out_dtype)
            plan.report.output = writer.commit(metadata)
            plan.report.output_bytes = os.path.getsize(plan.report.output)
        return plan.report
    finally:
        plan.close()


def merge_to_memory(recipe: MergeRecipe, out_dtype: str = "fp32", device: str | None = None,
                    progress: ProgressFn | None = None, cancel: CancelToken | None = None,
                    chunk: int | None = None, workers: int | None = None, stats: bool = True
                    ) -> tuple[dict[str, torch.Tensor], MergeReport]:
    """Merge into a state dict of CPU tensors (copied keys are fresh tensors too); ``stats`` as merge_to_file."""
    plan = MergePlan(recipe, out_dtype, stats=stats)
    try:
        state = dict(iter_merge(plan, device, progress, cancel, chunk, own_memory=True, workers=workers))
        return state, plan.report
    finally:
        plan.close()


__all__ = ["merge_to_file", "merge_to_memory", "build_metadata", "input_hashes", "default_device",
           "CancelToken", "Progress", "MergeReport", "MergePlan"]
