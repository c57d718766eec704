"""Turn what the tab's controls hold into a :class:`MergeRecipe`.

Kept apart from the gradio wiring so the mapping (titles to paths, blank
text to "unset", the method's preset values) is testable without a browser
and identical for every host.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import MergeError, ParameterError
from ..methods import METHODS
from ..recipe import MergeRecipe

# Preset dropdown order (the list); labels are the registry's titles.
PRESET_ORDER = ("ties", "ties_soup", "dare_ties", "dare_ties_soup", "add_difference", "weighted_sum", "slerp",
                "della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "model_stock", "geometric_median")
PRESET_TITLES = {name: METHODS[name].title for name in PRESET_ORDER}
TITLE_TO_METHOD = {title: name for name, title in PRESET_TITLES.items()}
DEFAULT_METHOD = "dare_ties_soup"
MERGE_MODES = ("method default", "mean", "sum")

# Slider value a knob takes when the method's preset does not name it (the engine's own fallbacks).
KNOB_FALLBACK = {"p": 0.0, "k": 1.0, "alpha": 1.0, "lam": 1.0, "vote_sgn": False}

# (lowest, highest) a slider offers: the recipe's ranges (recipe.RANGES), with an open end made the
# nearest value the slider's 0.01 step can reach (p < 1 -> 0.99, k > 0 -> 0.01).
SLIDER_RANGES = {"p": (0.0, 0.99), "k": (0.01, 1.0), "alpha": (-1.0, 2.0), "lam": (0.0, 2.0),
                 "alpha_unet": (-1.0, 2.0), "alpha_te": (-1.0, 2.0), "epsilon": (0.0, 0.49), "beta": (0.0, 0.99)}
# The knobs only some methods have (issue 12): shown greyed out unless the method uses them.
EXTRA_FALLBACK = {"epsilon": 0.1, "beta": 0.01, "rescale": "uniform"}
RESCALE_MODES = ("uniform", "unbiased")


def clamp_knob(knob: str, value: object) -> float | None:
    """The slider value to show instead of ``value`` when it lies outside the slider, else None.

    A value typed into a slider's number box stays on screen until the box
    loses focus, while the page already holds the clamped one: 1 shown, 0.99
    merged.  Answering each typed value with the clamped one keeps the box
    showing the value the merge will use.
    """
    lo, hi = SLIDER_RANGES[knob]
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if number != number:
        return None
    if number > hi:
        return hi
    if number < lo:
        return lo
    return None


def method_name(title_or_name: str) -> str:
    """Registry name from a dropdown title (or a name already)."""
    if title_or_name in TITLE_TO_METHOD:
        return TITLE_TO_METHOD[title_or_name]
    if title_or_name in METHODS:
        return title_or_name
    raise ParameterError(f"unknown merge method {title_or_name!r}")


def preset_values(method: str) -> dict[str, float | bool]:
    """The slider values a method preset sets (p, k, alpha, lam, vote_sgn)."""
    spec = METHODS[method_name(method)]
    values = {knob: spec.defaults.get(knob, fallback) for knob, fallback in KNOB_FALLBACK.items()}
    if spec.forced_vote_sgn is not None:
        values["vote_sgn"] = spec.forced_vote_sgn
    return values


def extra_preset_values(method: str) -> dict[str, float | str]:
    """The values a preset gives DELLA's epsilon, Breadcrumbs' beta and the rescale control."""
    spec = METHODS[method_name(method)]
    return {knob: spec.defaults.get(knob, fallback) for knob, fallback in EXTRA_FALLBACK.items()}


def knob_is_live(method: str, knob: str) -> bool:
    """Whether moving ``knob`` changes the result for ``method`` (else the control is greyed out)."""
    spec = METHODS[method_name(method)]
    if knob == "vote_sgn":
        return spec.forced_vote_sgn is None and "vote_sgn" in spec.uses
    return knob in spec.uses


def parse_weights(text: str | None) -> list[float] | None:
    """'1, 0.5' -> [1.0, 0.5]; blank -> None (every model weighs 1)."""
    items = [t for t in re.split(r"[,\s;]+", (text or "").strip()) if t]
    if not items:
        return None
    try:
        return [float(t) for t in items]
    except ValueError:
        raise ParameterError(f"weights: {text.strip()!r} is not a comma-separated list of numbers") from None


def parse_seed(value: object) -> int:
    """The seed box's value as an int >= 0 (gradio may hand over a float)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ParameterError(f"seed must be a whole number, got {value!r}") from None
    if number != int(number) or number < 0:
        raise ParameterError(f"seed must be a whole number >= 0, got {value!r}")
    return int(number)


@dataclass
class FormValues:
    """The recipe-relevant controls, in the order the tab passes them."""

    base: str | None
    models: Sequence[str] | None
    weights: str
    method: str
    p: float
    k: float
    alpha: float
    lam: float
    vote_sgn: bool
    seed: float | int
    split_alpha: bool
    alpha_unet: float
    alpha_te: float
    block_weights: str
    block_p: str
    block_k: str
    merge_mode: str
    vae: str
    skip_mismatched: bool
    epsilon: float = 0.1
    beta: float = 0.01
    rescale: str = "uniform"

    def recipe(self, resolve: Callable[[str], str]) -> MergeRecipe:
        """The recipe these values describe; checkpoint titles become paths via ``resolve``."""
        if not self.base:
            raise MergeError("pick a base checkpoint first")
        if not self.models:
            raise MergeError("pick at least one model to merge into the base")
        merge = None if self.merge_mode in (None, "", MERGE_MODES[0]) else self.merge_mode
        return MergeRecipe(
            method=method_name(self.method), base=resolve(self.base), models=[resolve(m) for m in self.models],
            p=float(self.p), k=float(self.k), alpha=float(self.alpha), lam=float(self.lam),
            vote_sgn=bool(self.vote_sgn), seed=parse_seed(self.seed), weights=parse_weights(self.weights),
            merge=merge,
            alpha_unet=float(self.alpha_unet) if self.split_alpha else None,
            alpha_te=float(self.alpha_te) if self.split_alpha else None,
            block_alpha=(self.block_weights or "").strip() or None,
            block_p=(self.block_p or "").strip() or None, block_k=(self.block_k or "").strip() or None,
            vae=self.vae or "base", on_mismatch="skip" if self.skip_mismatched else "error",
            # a knob the method does not use stays unset, so it is neither stored nor reported as ignored
            epsilon=float(self.epsilon) if knob_is_live(self.method, "epsilon") else None,
            beta=float(self.beta) if knob_is_live(self.method, "beta") else None,
            rescale=(self.rescale or "uniform") if knob_is_live(self.method, "rescale") else None)


FORM_FIELDS = tuple(FormValues.__dataclass_fields__)
