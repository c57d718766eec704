"""What the merge knobs do, measured: a small classifier, task fine-tunes, every method through our engine.

A stand-in for SD checkpoints small enough to train in seconds on a CPU:

* data: scikit-learn's handwritten digits (1797 8x8 images, 10 classes), split 60/40;
* base: an MLP 64-128-128-10 trained briefly on every class (it knows a little of everything);
* tasks: four fine-tunes of the base, each trained longer on its own classes only
  ({0,1,2}, {3,4,5}, {6,7}, {8,9}); each becomes good at its classes and forgets the others;
* merge: the four fine-tunes into the base with ``lib_merge.merge_to_memory`` (the same engine, masks
  and kernels as the CLI and the tab), the tensors stored under SD1 UNet key names so the engine
  treats them as UNet weights; accuracy of the merged MLP on the held-out 40 %, all ten classes.

Plots (``--out``, default next to this file): accuracy against p for DARE-TIES with lambda 1, lambda 0
and the unbiased rescale, DELLA and task arithmetic; against epsilon (DELLA); against lambda with
the unbiased rescale as a line; and each method at its preset and at its best alpha.  Random
methods are averaged over ``--seeds`` mask seeds.  Run from the repository root:

    PYTHONPATH=<where scikit-learn and matplotlib are> .venv/bin/python benchmarks/fidelity/fidelity.py
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from lib_merge import MergeRecipe, merge_to_memory   # noqa: E402

PREFIX = "model.diffusion_model.fidelity."
MARKER = "cond_stage_model.transformer.fidelity_marker"   # makes the file an "SD1" checkpoint for the engine
GROUPS = [(0, 1, 2), (3, 4, 5), (6, 7), (8, 9)]
SIZES = (64, 128, 128, 10)
# The four task vectors are large next to the base (each fine-tune forgets the other classes), so the
# sweeps merge at a fixed alpha near the best one of the mean-based methods at p = 0 (and the sum at its own).
SWEEP_ALPHA = 0.25
SUM_ALPHA = 0.1


def load_digits_split(seed: int = 0):
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.6 * len(y))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def make_mlp() -> torch.nn.Sequential:
    layers = []
    for i in range(len(SIZES) - 1):
        layers.append(torch.nn.Linear(SIZES[i], SIZES[i + 1]))
        if i < len(SIZES) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def train(model, x, y, epochs: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for lo in range(0, len(y), 32):
            idx = order[lo:lo + 32]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def to_checkpoint(model, path: str) -> None:
    state = {PREFIX + k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    state[MARKER] = torch.zeros(1)
    save_file(state, path)


def from_state(state: dict) -> torch.nn.Sequential:
    model = make_mlp()
    model.load_state_dict({k[len(PREFIX):]: v.float() for k, v in state.items() if k.startswith(PREFIX)})
    return model


def build_models(folder: str, train_set) -> tuple[str, list[str], dict]:
    x, y = train_set
    torch.manual_seed(0)
    base = make_mlp()
    train(base, x, y, epochs=2, lr=0.02, seed=0)
    base_path = os.path.join(folder, "base.safetensors")
    to_checkpoint(base, base_path)
    paths = []
    for t, classes in enumerate(GROUPS):
        model = make_mlp()
        model.load_state_dict(base.state_dict())
        mask = torch.isin(y, torch.tensor(classes))
        train(model, x[mask], y[mask], epochs=10, lr=0.005, seed=t + 1)
        path = os.path.join(folder, f"task{t}.safetensors")
        to_checkpoint(model, path)
        paths.append(path)
    return base_path, paths, {"base": base}


def merged_accuracy(recipe: MergeRecipe, test_set) -> float:
    state, _ = merge_to_memory(recipe, out_dtype="fp32", device="cpu")
    return accuracy(from_state(state), *test_set)


def mean_over_seeds(make, seeds: int, test_set) -> float:
    return sum(merged_accuracy(make(s), test_set) for s in range(seeds)) / seeds


def sweep_p(base, models, test_set, seeds):
    ps = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    lines = {
        "DARE-TIES, λ = 1 (uniform)": lambda p, s: MergeRecipe("dare_ties", base, models, p=p, seed=s, lam=1.0,
                                                                alpha=SWEEP_ALPHA),
        "DARE-TIES, λ = 0": lambda p, s: MergeRecipe("dare_ties", base, models, p=p, seed=s, lam=0.0,
                                                      alpha=SWEEP_ALPHA),
        "DARE-TIES, unbiased rescale": lambda p, s: MergeRecipe("dare_ties", base, models, p=p, seed=s,
                                                                 rescale="unbiased", alpha=SWEEP_ALPHA),
        "DELLA, ε = min(0.1, p)": lambda p, s: MergeRecipe("della", base, models, p=p, seed=s,
                                                           epsilon=min(0.1, p, 0.99 - p), alpha=SWEEP_ALPHA),
        f"task arithmetic (sum), λ = 1, alpha {SUM_ALPHA}": lambda p, s: MergeRecipe(
            "add_difference", base, models, p=p, seed=s, alpha=SUM_ALPHA),
    }
    return ps, {name: [mean_over_seeds(lambda s, p=p: make(p, s), seeds, test_set) for p in ps]
                for name, make in lines.items()}


def sweep_eps(base, models, test_set, seeds):
    out = {}
    for p in (0.5, 0.8):
        top = min(p, 1 - p)
        eps = [round(top * i / 5, 4) for i in range(5)] + [round(top * 0.98, 4)]
        out[f"DELLA p = {p}"] = (eps, [mean_over_seeds(
            lambda s, e=e: MergeRecipe("della", base, models, p=p, epsilon=e, seed=s, alpha=SWEEP_ALPHA),
            seeds, test_set)
            for e in eps])
    return out


def sweep_lambda(base, models, test_set, seeds):
    lams = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    out = {}
    for p in (0.5, 0.9):
        acc = [mean_over_seeds(lambda s, lam=lam: MergeRecipe("dare_ties", base, models, p=p, lam=lam, seed=s,
                                                              alpha=SWEEP_ALPHA), seeds, test_set) for lam in lams]
        unbiased = mean_over_seeds(lambda s: MergeRecipe("dare_ties", base, models, p=p, rescale="unbiased",
                                                         seed=s, alpha=SWEEP_ALPHA), seeds, test_set)
        out[f"p = {p}"] = (lams, acc, unbiased)
    return out


METHOD_RECIPES = {
    "weighted_sum": {}, "add_difference": {}, "ties": {}, "ties_soup": {}, "dare_ties": {},
    "dare_ties (unbiased)": {"method": "dare_ties", "rescale": "unbiased"}, "dare_ties_soup": {},
    "della": {}, "della_linear": {}, "breadcrumbs": {}, "breadcrumbs_ties": {},
    "model_stock": {}, "geometric_median": {},
}
ALPHAS = [0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5]


def methods_compared(base, models, test_set, seeds):
    out = {}
    for label, extra in METHOD_RECIPES.items():
        extra = dict(extra)
        method = extra.pop("method", label)

        def make(s, alpha=None):
            knobs = dict(extra)
            if alpha is not None:
                knobs["alpha"] = alpha
            return MergeRecipe(method, base, models, seed=s, **knobs)
        preset = mean_over_seeds(make, seeds, test_set)
        tuned = max((mean_over_seeds(lambda s, a=a: make(s, a), seeds, test_set), a) for a in ALPHAS)
        out[label] = {"preset": preset, "best": tuned[0], "best_alpha": tuned[1]}
    return out


def plot(results: dict, out_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    ref = results["reference"]

    def finish(ax, name, xlabel):
        ax.axhline(ref["base"], color="grey", ls=":", lw=1, label="base")
        ax.axhline(ref["mean_task_on_own"], color="black", ls="--", lw=1, label="fine-tunes, own classes")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy, all 10 classes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best", framealpha=0.8)
        path = os.path.join(out_dir, name)
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=110)
        plt.close(ax.figure)
        files.append(path)

    ps, lines = results["p"]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, acc in lines.items():
        ax.plot(ps, acc, marker="o", ms=3, label=name)
    ax.set_title(f"Accuracy against the drop rate p (alpha {SWEEP_ALPHA})")
    finish(ax, "accuracy_vs_p.png", "p (DARE drop rate)")

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, (eps, acc) in results["epsilon"].items():
        ax.plot(eps, acc, marker="o", ms=3, label=name)
    ax.set_title(f"DELLA: accuracy against ε (alpha {SWEEP_ALPHA})")
    finish(ax, "accuracy_vs_epsilon.png", "ε (keep probability 1-p-ε .. 1-p+ε by |δ| rank)")

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, (name, (lams, acc, unbiased)) in enumerate(results["lambda"].items()):
        line = ax.plot(lams, acc, marker="o", ms=3, label=f"DARE-TIES {name}, uniform (1-p)^-λ")[0]
        ax.axhline(unbiased, color=line.get_color(), ls="-.", lw=1, label=f"DARE-TIES {name}, unbiased")
    ax.set_title(f"Accuracy against λ, and the unbiased rescale (alpha {SWEEP_ALPHA})")
    finish(ax, "accuracy_vs_lambda.png", "λ (rescale strength)")

    fig, ax = plt.subplots(figsize=(7.2, 4))
    names = list(results["methods"])
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [results["methods"][n]["preset"] for n in names], 0.4, label="preset")
    ax.bar([x + 0.2 for x in xs], [results["methods"][n]["best"] for n in names], 0.4, label="best alpha")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_title("Method against method: its preset, and its best alpha")
    finish(ax, "methods.png", "")
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="mask seeds averaged per point (default 10)")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--quick", action="store_true", help="one seed, fewer points: a smoke run")
    a = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    train_set, test_set = load_digits_split()
    with tempfile.TemporaryDirectory(prefix="dare-fidelity-") as folder:
        os.environ.setdefault("DARE_MERGE_CACHE", folder)
        base, models, extra = build_models(folder, train_set)
        x, y = test_set
        own = []
        for path, classes in zip(models, GROUPS):
            model = from_state(load_file(path))
            mask = torch.isin(y, torch.tensor(classes))
            own.append(accuracy(model, x[mask], y[mask]))
        reference = {"base": accuracy(extra["base"], *test_set),
                     "tasks_on_all": [accuracy(from_state(load_file(p)), *test_set) for p in models],
                     "mean_task_on_own": sum(own) / len(own)}
        print("reference:", json.dumps(reference))
        seeds = 1 if a.quick else a.seeds
        results = {"reference": reference, "seeds": seeds}
        results["p"] = sweep_p(base, models, test_set, seeds)
        print("p sweep done", round(time.time() - started, 1), "s")
        results["epsilon"] = sweep_eps(base, models, test_set, seeds)
        results["lambda"] = sweep_lambda(base, models, test_set, seeds)
        print("epsilon and lambda sweeps done", round(time.time() - started, 1), "s")
        results["methods"] = methods_compared(base, models, test_set, seeds)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)
    for path in plot(results, a.out):
        print("wrote", path)
    for name, r in results["methods"].items():
        print(f"{name:22s} preset {r['preset']:.3f}   best {r['best']:.3f} (alpha {r['best_alpha']})")
    print(f"done in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
