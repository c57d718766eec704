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
    kind: str                      # "delta", "della", "lincomb", "weighted_sum" or "slerp"
    title: str
    elect: bool = False            # TIES sign election
    trim: bool = False             # step 3 (k) applies
    forced_vote_sgn: bool | None = None
    default_merge: str = "mean"
    defaults: dict = field(default_factory=dict)  # preset values of p, k, alpha, lam, vote_sgn, epsilon, beta
    uses: tuple[str, ...] = ()     # knobs that change the result
    help: str = ""
    min_models: int = 1

    @property
    def zero_delta_counts(self) -> str:
        """What a model equal to the base (an all-zero delta) does to this method, in words.

        With a sign election a zero delta never has the elected sign, so it is
        left out of the election and of the mean; without one it takes part.
        """
        if self.kind == "weighted_sum":
            return "it weighs in the weighted sum like any model (pulling the soup towards the base)"
        if self.kind == "slerp":
            return "slerp with the base itself returns the base"
        if self.kind == "lincomb" and self.name == "model_stock":
            return ("its cosine with every other delta counts as 0, which lowers the mean cosine and so "
                    "Model Stock's ratio t, and it counts in mean(delta): the merge shrinks")
        if self.kind == "lincomb":
            return "it is one more point at the base, which pulls the median towards the base"
        if self.elect:
            return ("its delta is zero, so it changes neither the sign election nor the TIES mean "
                    "(it only adds nothing to a sum)")
        return ("its delta is zero and, without a sign election, it still counts: with merge = mean the merged "
                "delta shrinks to N/(N + 1) of what it would be; with merge = sum it changes nothing")


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
    uses=("p", "k", "vote_sgn", "lam", "rescale", "alpha", "weights", "seed", "merge"),
    help="Trim to the top-k magnitudes, elect a sign per element, average the agreeing deltas."))
_register(MethodSpec(
    "ties_soup", "delta", "TIES-SOUP", elect=True, trim=True, forced_vote_sgn=True,
    defaults={"p": 0.0, "k": 1.0, "alpha": 1.0, "vote_sgn": True},
    uses=("p", "k", "lam", "rescale", "alpha", "weights", "seed", "merge"),
    help="TIES with the sign elected by counting signs (AstolfoMix: k = 1, alpha = 1)."))
_register(MethodSpec(
    "dare_ties", "delta", "DARE-TIES", elect=True, trim=True,
    defaults={"p": 0.5, "k": 1.0, "alpha": 1.0, "lam": 1.0, "vote_sgn": False},
    uses=("p", "k", "vote_sgn", "lam", "rescale", "alpha", "weights", "seed", "merge"),
    help="DARE's random drop (rate p, rescale (1-p)^-lambda) before TIES."))
_register(MethodSpec(
    "dare_ties_soup", "delta", "DARE-TIES-SOUP", elect=True, trim=True, forced_vote_sgn=True,
    defaults={"p": 0.5, "k": 1.0, "alpha": 0.5, "lam": 1.0, "vote_sgn": True},
    uses=("p", "k", "lam", "rescale", "alpha", "weights", "seed", "merge"),
    help="DARE, then TIES with sign counting (the DARE-merge notes: p 0.5, k 1, alpha 0.5)."))
_register(MethodSpec(
    "della", "della", "DELLA", elect=True, trim=True,
    defaults={"p": 0.5, "epsilon": 0.1, "k": 1.0, "alpha": 1.0, "lam": 1.0, "vote_sgn": False},
    uses=("p", "epsilon", "k", "vote_sgn", "lam", "alpha", "weights", "seed", "merge"),
    help="DARE whose keep probability grows with |delta|'s rank in its row (1-p-eps .. 1-p+eps), each kept "
         "element rescaled by its own probability, then TIES (elect, disjoint mean)."))
_register(MethodSpec(
    "della_linear", "della", "DELLA (linear)", default_merge="sum",
    defaults={"p": 0.5, "epsilon": 0.1, "alpha": 1.0, "lam": 1.0},
    uses=("p", "epsilon", "lam", "alpha", "weights", "seed", "merge"),
    help="DELLA's magnitude-ranked drop, then the deltas summed (no sign election)."))
_register(MethodSpec(
    "breadcrumbs", "delta", "Model Breadcrumbs", trim=True, default_merge="sum",
    defaults={"p": 0.0, "k": 0.9, "beta": 0.01, "alpha": 1.0},
    uses=("k", "beta", "alpha", "weights", "merge"),
    help="Per tensor, drop the largest beta fraction of |delta| (outliers) and keep the next k fraction; sum."))
_register(MethodSpec(
    "breadcrumbs_ties", "delta", "Model Breadcrumbs + TIES", elect=True, trim=True,
    defaults={"p": 0.0, "k": 0.9, "beta": 0.01, "alpha": 1.0, "vote_sgn": False},
    uses=("k", "beta", "vote_sgn", "alpha", "weights", "merge"),
    help="Breadcrumbs' band of magnitudes, then a sign election and the disjoint mean."))
_register(MethodSpec(
    "model_stock", "lincomb", "Model Stock", min_models=2,
    defaults={"alpha": 1.0}, uses=("alpha",),
    help="theta0 + alpha * t * mean(delta), t = N c / (1 + (N-1) c) from the mean cosine c of the deltas."))
_register(MethodSpec(
    "geometric_median", "lincomb", "Geometric median",
    defaults={"alpha": 1.0}, uses=("alpha", "weights"),
    help="The weighted geometric median of the models (Weiszfeld), moved from the base by alpha."))
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
