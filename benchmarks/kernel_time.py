"""Time the merge maths alone: every key's inputs already on the device, whole tensors.

The harness's wall times include reading, writing and host<->device copies;
this isolates the kernels (the issue's GPU target: an SD1-sized dare_ties
over N = 3 in the tens of milliseconds).  Per key, the base and model tensors
are moved to the device outside the timed span; the timed span is the
engine's per-chunk kernel run on the whole key, bracketed by
torch.cuda.synchronize() on CUDA, after one warm-up key.  On CUDA it also
checks that DARE masks are bit-identical to the CPU's for the same seed.

    python benchmarks/kernel_time.py --job '{"method": "dare_ties", "n": 3, "p": 0.5, ...}' \
        --base B --models M1 M2 M3 --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", required=True, help="JSON of benchmarks/jobs.Job fields")
    ap.add_argument("--base", required=True)
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--mask-keys", type=int, default=4, help="keys whose CPU and CUDA masks are compared")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1, as the engine's workers use: on a loaded machine "
                         "multi-threaded ops wait at per-op barriers for a core that another process holds)")
    a = ap.parse_args()
    import torch
    from lib_merge import MergeRecipe, kernels
    from lib_merge.engine import MergePlan
    from lib_merge.masks import MaskHasher, keep_mask, mask_salt

    job = json.loads(a.job)
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    recipe = MergeRecipe(job["method"], a.base, a.models, p=job.get("p"), k=job.get("k"), alpha=job.get("alpha"),
                         lam=job.get("lam"), vote_sgn=job.get("vote_sgn"), seed=job.get("seed", 42), vae="merge")
    if job["method"] == "weighted_sum":
        recipe = MergeRecipe("weighted_sum", a.base, a.models, alpha=job.get("alpha"), vae="merge")
    plan = MergePlan(recipe, "fp16")
    tasks = [t for t in plan.tasks if t.action == "merge" and t.channel_slice is None]
    largest = max(int(torch.Size(t.shape).numel()) for t in tasks)
    hasher = MaskHasher(device, max_chunk=min(largest, 1 << 24))
    fused = hasattr(kernels, "delta_merge_fused") and hasattr(kernels, "Workspace")
    ws = kernels.Workspace(len(a.models), largest, device) if fused and plan.spec.kind == "delta" else None
    seed = plan.recipe.seed

    def run_key(task, theta0, thetas) -> torch.Tensor:
        weights = [plan.recipe.weights[i] for i in task.models]
        if plan.spec.kind == "weighted_sum":
            return kernels.weighted_sum(theta0, thetas, weights, task.params.alpha)
        masks = ([kernels.DropMask(hasher, mask_salt(seed, task.key, i)) for i in task.models]
                 if task.params.p > 0 else None)
        if ws is not None:
            return kernels.delta_merge_fused(theta0, thetas, weights, task.params, ws, masks, None, 0)
        return kernels.delta_merge(theta0, thetas, weights, task.params, masks, None, 0)

    total = 0.0
    elements = 0
    per_key_max = (0.0, "")
    for index, task in enumerate([tasks[0], *tasks]):   # the first key twice: a warm-up run
        theta0 = plan.base.tensor(task.key).reshape(-1).to(device)
        thetas = [plan.models[i].tensor(task.key).reshape(-1).to(device) for i in task.models]
        _sync(device)
        started = time.perf_counter()
        out = run_key(task, theta0, thetas)
        out = out.to(task.dtype)
        _sync(device)
        seconds = time.perf_counter() - started
        del out, theta0, thetas
        if index == 0:
            continue
        total += seconds
        elements += int(torch.Size(task.shape).numel())
        if seconds > per_key_max[0]:
            per_key_max = (seconds, task.key)

    result = {"device": str(device), "kernel_s": round(total, 4), "keys": len(tasks), "elements": elements,
              "slowest_key": per_key_max[1], "slowest_key_s": round(per_key_max[0], 4),
              "path": "delta_merge_fused" if ws is not None else plan.spec.kind}
    if device.type == "cuda" and plan.recipe.p and plan.recipe.p > 0:
        same = True
        for task in tasks[:a.mask_keys]:
            n = int(torch.Size(task.shape).numel())
            for i in task.models:
                cpu = keep_mask(seed, task.key, i, plan.recipe.p, n, "cpu")
                gpu = keep_mask(seed, task.key, i, plan.recipe.p, n, device).cpu()
                same = same and bool(torch.equal(cpu, gpu))
        result["masks_bit_identical_cpu_cuda"] = same
        result["gpu"] = torch.cuda.get_device_name(device)
    plan.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
