"""Registry of merge methods: each is a preset of the kernel steps.

Like sd-mecha's registry, a method is data (which steps run, which knobs
matter, the preset values the literature uses), so the CLI, the tab, the XYZ
axes and the docs all read the same table.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: str                      # "delta", "weighted_sum" or "slerp"
    title: str
    elect: bool = False            # TIES sign election
    trim: bool = False             # step 3 (k) applies
    forced_vote_sgn: bool | None = None
    default_merge: str = "mean"
    defaults: dict = field(default_factory=dict)  # preset values of p, k, alpha, lam, vote_sgn
    uses: tuple[str, ...] = ()     # knobs that change the result
    help: str = ""


METHODS: dict[str, MethodSpec] = {}


def _register(spec: MethodSpec) -> None:
    METHODS[spec.name] = spec


_register(MethodSpec(
    "weighted_sum", "weighted_sum", "Weighted sum",
    defaults={"alpha": 1.0}, uses=("alpha", "weights"),
    help="Model soup: the weighted average of the models; alpha moves from the base to it."))
_register(MethodSpec(
    "add_difference", "delta", "Task arithmetic (add difference)",
    default_merge="sum", defaults={"p": 0.0, "alpha": 1.0, "lam": 1.0},
    uses=("p", "lam", "alpha", "weights", "seed", "merge"),
    help="theta0 + alpha * sum of the deltas; with p > 0 it is DARE task arithmetic."))
_register(MethodSpec(
    "ties", "delta", "TIES", elect=True, trim=True,
    defaults={"p": 0.0, "k": 0.2, "alpha": 1.0, "vote_sgn": False},
    uses=("p", "k", "vote_sgn", "lam", "alpha", "weights", "seed", "merge"),
    help="Trim to the top-k magnitudes, elect a sign per element, average the agreeing deltas."))
_register(MethodSpec(
    "ties_soup", "delta", "TIES-SOUP", elect=True, trim=True, forced_vote_sgn=True,
    defaults={"p": 0.0, "k": 1.0, "alpha": 1.0, "vote_sgn": True},
    uses=("p", "k", "lam", "alpha", "weights", "seed", "merge"),
    help="TIES with the sign elected by counting signs (AstolfoMix: k = 1, alpha = 1)."))
_register(MethodSpec(
    "dare_ties", "delta", "DARE-TIES", elect=True, trim=True,
    defaults={"p": 0.5, "k": 1.0, "alpha": 1.0, "lam": 1.0, "vote_sgn": False},
    uses=("p", "k", "vote_sgn", "lam", "alpha", "weights", "seed", "merge"),
    help="DARE's random drop (rate p, rescale (1-p)^-lambda) before TIES."))
_register(MethodSpec(
    "dare_ties_soup", "delta", "DARE-TIES-SOUP", elect=True, trim=True, forced_vote_sgn=True,
    defaults={"p": 0.5, "k": 1.0, "alpha": 0.5, "lam": 1.0, "vote_sgn": True},
    uses=("p", "k", "lam", "alpha", "weights", "seed", "merge"),
    help="DARE, then TIES with sign counting (the DARE-merge notes: p 0.5, k 1, alpha 0.5)."))
_register(MethodSpec(
    "slerp", "slerp", "Slerp",
    defaults={"alpha": 0.5}, uses=("alpha",),
    help="Spherical interpolation between the base and one model, by alpha."))

ALIASES = {"task_arithmetic": "add_difference", "ta": "add_difference",
           "dare": "add_difference", "soup": "weighted_sum"}


def get_method(name: str) -> MethodSpec:
    key = ALIASES.get(name.strip().lower().replace("-", "_"), name.strip().lower().replace("-", "_"))
    if key not in METHODS:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[key]
