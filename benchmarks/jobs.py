"""The benchmark's jobs, and how each one is spelled for us and for sd-mecha 1.1.8.

Our knobs mean what lib_merge/kernels.py's module docstring says.  sd-mecha 1.1.8 spells the same maths
differently (read from its source, sd_mecha/extensions/builtin/merge_methods/
ties.py and wrappers.py), and two of its boolean flags read backwards:

* ``vote_sgn``: sd-mecha's ``False`` elects sign(sum of signs) -- it *counts*
  signs ("TIES-SOUP"); its ``True`` elects sign(sum of deltas), the TIES paper.
  So ours = ``not`` theirs.
* ``apply_stock`` (ties_sum_extended / ties_sum_with_dropout /
  add_ties_with_dare): ``t = 1.0 if apply_stock else model_stock_t(...)``, so
  its default ``False`` multiplies the merged delta by a model-stock factor.
  Plain TIES/DARE-TIES needs ``apply_stock=True``.
* DARE: ``probability`` is the drop rate (our p); ``rescale`` is a bool:
  True divides by (1 - p) (our lambda = 1), False does not (lambda = 0); no
  other lambda can be expressed.  Masks come from torch.bernoulli with a
  generator re-seeded with ``seed`` at every key, so they cannot match ours.
* ``k`` is the keep fraction with the same rank rule (max(int((1-k) n), 1)-th
  smallest |delta|, ties kept); at k = 1 it still runs a full kthvalue.
* TIES mean: sum of agreeing deltas / number of agreeing models, no weights.
* weighted_sum of N models (no base) is ``n_average``; sd-mecha's
  ``weighted_sum`` takes two models.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, replace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SEED = 42


@dataclass(frozen=True)
class Job:
    name: str             # label in the table
    method: str           # our method name
    n: int                # number of fine-tunes
    p: float = 0.0
    k: float = 1.0
    lam: float = 1.0
    alpha: float = 1.0
    vote_sgn: bool = False  # OUR meaning: True = count signs

    @property
    def label(self) -> str:
        knobs = {"weighted_sum": "",
                 "ties": f"k={self.k:g}",
                 "dare_ties": f"p={self.p:g} k={self.k:g}",
                 "dare_ties_soup": f"p={self.p:g} k={self.k:g} λ={self.lam:g}"}.get(self.method, "")
        return f"{self.method} {knobs}".strip()


# The jobs (N = 3), and the sweep over N for dare_ties_soup.
BASE_JOBS = {
    "weighted_sum": Job("weighted_sum", "weighted_sum", 3, alpha=1.0),
    "ties": Job("ties", "ties", 3, p=0.0, k=0.2, lam=1.0, alpha=1.0, vote_sgn=False),
    "dare_ties": Job("dare_ties", "dare_ties", 3, p=0.5, k=1.0, lam=1.0, alpha=1.0, vote_sgn=False),
    "dare_ties_soup": Job("dare_ties_soup", "dare_ties_soup", 3, p=0.1, k=1.0, lam=0.0, alpha=1.0,
                          vote_sgn=True),
}
SWEEP_JOB = "dare_ties_soup"


def expand(job_names: list[str], n_list: list[int], base_n: int = 3) -> list[Job]:
    """Each named job at N = base_n, then the sweep job at every other N of n_list."""
    jobs = [replace(BASE_JOBS[name], n=base_n) for name in job_names]
    if SWEEP_JOB in job_names or not job_names:
        jobs += [replace(BASE_JOBS[SWEEP_JOB], n=n) for n in n_list if n != base_n]
    return jobs


def ours_cmd(python: str, job: Job, base: str, models: list[str], out: str, device: str) -> list[str]:
    """Our CLI, every knob explicit; the VAE is merged so both tools do the same work on every key."""
    cmd = [python, "-m", "lib_merge", "merge", "--base", base, "--models", *models, "--method", job.method,
           "--alpha", repr(job.alpha), "--seed", str(SEED), "--merge-vae", "--device", device,
           "--dtype", "fp16", "--out", out, "--quiet"]
    if job.method != "weighted_sum":
        cmd += ["--p", repr(job.p), "--k", repr(job.k), "--lambda", repr(job.lam)]
        if job.vote_sgn:
            cmd += ["--vote-sgn"]
    return cmd


def mecha_spec(job: Job) -> dict:
    """The sd-mecha call that computes the same maths as ``job`` (see the module doc)."""
    if job.method == "weighted_sum":
        return {"recipe": "n_average", "alpha": job.alpha}
    if job.method in ("ties", "ties_soup") and job.p == 0.0:
        return {"recipe": "ties_sum", "k": job.k, "vote_sgn": not job.vote_sgn, "alpha": job.alpha}
    if job.lam not in (0.0, 1.0):
        raise ValueError(f"sd-mecha can only rescale with lambda 0 or 1, not {job.lam}")
    return {"recipe": "ties_sum_with_dropout", "probability": job.p, "rescale": job.lam == 1.0, "k": job.k,
            "vote_sgn": not job.vote_sgn, "apply_stock": True, "seed": SEED, "alpha": job.alpha}


def mecha_cmd(python: str, job: Job, base: str, models: list[str], out: str) -> list[str]:
    return [python, os.path.join(HERE, "mecha_merge.py"), "--spec", json.dumps(mecha_spec(job)),
            "--base", base, "--models", *models, "--out", out]


def ours_env(hash_cache_dir: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["DARE_MERGE_CACHE"] = hash_cache_dir
    return env


def describe(job: Job) -> str:
    return json.dumps({"ours": asdict(job), "sd-mecha": mecha_spec(job)}, ensure_ascii=False)


if __name__ == "__main__":
    for job in expand(list(BASE_JOBS), [2, 3, 4, 8]):
        print(describe(job), file=sys.stdout)


def job_dict(job: Job) -> dict:
    """Fields for kernel_time.py (our meaning of every knob), with the seed."""
    return {**asdict(job), "seed": SEED}
