"""The merge knobs as X/Y/Z plot axes: definitions, value parsing, range checks, infotext.

Pure Python (no WebUI import) so that it can be unit-tested;
``lib_merge.webui.xyz.register_axes`` turns each :class:`AxisSpec` into the
built-in ``xyz_grid.AxisOption``.

Why not just give the built-in ``float``/``int`` types: ``xyz_grid`` expands
``"0.1-0.9 (+0.2)"`` with ``np.arange(start, end + step, step)`` and
``"0.1-0.9 [5]"`` with ``np.linspace``, which yields 0.30000000000000004 and can
overshoot the end (``"0-1 (+0.3)"`` gives 1.2, outside the range the user
wrote).  A merge knob's value is part of the recipe hash and of the infotext,
so the values here are computed exactly (``fractions.Fraction`` from the
decimal text) and rounded once to the nearest double: 0.3 is 0.3.  The
grammar is the built-in one: comma-separated values (CSV quoting), ranges
``a-b`` (step 1 towards b), ``a-b (+s)`` / ``a-b (-s)`` (the step's sign is
required, as in the WebUI) and ``a-b [n]`` (n evenly spaced values, ends
included).  Differences, all deliberate: no float drift; a range never goes
past its end; a step pointing away from the end, a zero step or an unsigned
step is an error naming the value instead of an empty or odd axis; ``a-b``
with b < a counts down; integer ranges with a negative step include their end
(the built-in ``range(start, end + 1, step)`` drops it).

The axes are given distinct costs above the built-in "Checkpoint name" (1.0):
``xyz_grid`` loops the strictly most expensive axis outermost and falls back
to Z-outermost on ties, so equal costs for two merge axes would let a seed on
Z run outermost and re-merge every cell for every seed.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, replace
from fractions import Fraction
from io import StringIO
from itertools import chain
from typing import Any, Callable, Iterable, Mapping

from .errors import ParameterError
from .methods import METHODS, get_method
from .recipe import RESCALES, MergeRecipe, check_range

LABEL_PREFIX = "[DARE] "
MAX_VALUES = 1000  # a typo like "0-1 (+0.0001)" should fail fast, not build a 10001-cell grid
MAX_SEED = (1 << 63) - 1

_TRUE = ("true", "on", "yes", "y", "1")
_FALSE = ("false", "off", "no", "n", "0")


# ----------------------------------------------------------------------------- axis table

@dataclass(frozen=True)
class AxisSpec:
    """One merge knob as an X/Y/Z axis."""

    label: str            # shown in the axis dropdown and the grid legend
    field: str            # MergeRecipe field the value overrides
    kind: str             # "float", "int", "bool", "method" or "rescale"
    cost: float           # xyz_grid loops the highest-cost axis outermost
    knob: str | None = None  # recipe.RANGES entry that bounds the value

    @property
    def choices(self) -> list[str] | None:
        """Dropdown values (None: free text)."""
        if self.kind == "method":
            return list(METHODS)
        if self.kind == "bool":
            return ["False", "True"]
        if self.kind == "rescale":
            return list(RESCALES)
        return None

    def parse(self, text: str) -> list[Any]:
        """Values of a free-text axis (``xyz_grid`` calls this as ``prepare``)."""
        return parse_values(text, self.kind, self.label)

    def coerce(self, value: Any) -> Any:
        """One value in its canonical type (``xyz_grid`` calls this as ``type``)."""
        return coerce_value(value, self.kind, self.label)

    def confirm(self, values: Iterable[Any]) -> None:
        """Refuse the whole axis before the grid starts if any value is out of range."""
        confirm_values(self, values)

    def format(self, value: Any) -> str:
        """Grid legend text, e.g. ``[DARE] p: 0.3``."""
        return f"{self.label}: {format_number(value) if self.kind in ('float', 'int') else value}"


AXES: tuple[AxisSpec, ...] = (
    AxisSpec(LABEL_PREFIX + "p", "p", "float", 1.8, "p"),
    AxisSpec(LABEL_PREFIX + "k", "k", "float", 1.7, "k"),
    AxisSpec(LABEL_PREFIX + "alpha", "alpha", "float", 1.45, "alpha"),
    AxisSpec(LABEL_PREFIX + "lambda", "lam", "float", 1.6, "lam"),
    AxisSpec(LABEL_PREFIX + "vote_sgn", "vote_sgn", "bool", 1.55),
    AxisSpec(LABEL_PREFIX + "seed", "seed", "int", 1.5),
    AxisSpec(LABEL_PREFIX + "method", "method", "method", 1.9),
    AxisSpec(LABEL_PREFIX + "alpha UNet", "alpha_unet", "float", 1.4, "alpha"),
    AxisSpec(LABEL_PREFIX + "alpha TE", "alpha_te", "float", 1.35, "alpha"),
    AxisSpec(LABEL_PREFIX + "epsilon", "epsilon", "float", 1.75, "epsilon"),
    AxisSpec(LABEL_PREFIX + "beta", "beta", "float", 1.65, "beta"),
    AxisSpec(LABEL_PREFIX + "rescale", "rescale", "rescale", 1.58),
)
AXES_BY_LABEL: dict[str, AxisSpec] = {a.label: a for a in AXES}
AXES_BY_FIELD: dict[str, AxisSpec] = {a.field: a for a in AXES}


# ----------------------------------------------------------------------------- parsing

_INT = r"[+-]?\s*\d+"
_DEC = r"[+-]?\s*\d+(?:\.\d*)?"
_RE_INT_STEP = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\(\s*([+-]?\s*\d+)\s*\))?\s*")
_RE_INT_COUNT = re.compile(rf"\s*({_INT})\s*-\s*({_INT})\s*\[\s*(\d+(?:\.\d*)?)\s*\]\s*")
_RE_DEC_STEP = re.compile(rf"\s*({_DEC})\s*-\s*({_DEC})(?:\s*\(\s*([+-]?\s*\d+(?:\.\d*)?)\s*\))?\s*")
_RE_DEC_COUNT = re.compile(rf"\s*({_DEC})\s*-\s*({_DEC})\s*\[\s*(\d+(?:\.\d*)?)\s*\]\s*")


def split_csv(text: str) -> list[str]:
    """The WebUI's ``csv_string_to_list_strip``: CSV fields, stripped, empty ones dropped."""
    fields = chain.from_iterable(csv.reader(StringIO(text or ""), skipinitialspace=True))
    return [f.strip() for f in fields if f.strip()]


def join_csv(values: Iterable[str]) -> str:
    """The WebUI's ``list_to_csv_string``: names holding commas get CSV quotes."""
    with StringIO() as handle:
        csv.writer(handle).writerow(list(values))
        return handle.getvalue().strip()


def _frac(text: str) -> Fraction:
    return Fraction(text.replace(" ", ""))


def format_number(value: Any) -> str:
    """Shortest faithful text of a knob value (0.3, 1, 0.125; never 0.30000000000000004)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    x = float(value)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return format(x, ".12g")


def _count(label: str, val: str, count_text: str) -> int:
    count = Fraction(count_text)
    if count.denominator != 1:
        raise ValueError(f'{label}: "{val}": the count in [..] must be a whole number')
    n = int(count)
    if n > MAX_VALUES:
        raise ValueError(f'{label}: "{val}" asks for {n} values; at most {MAX_VALUES}')
    return n


def _stepped(label: str, val: str, start: Fraction, end: Fraction, step_text: str | None) -> list[Fraction]:
    if step_text is None:
        step = Fraction(1) if end >= start else Fraction(-1)
    else:
        compact = step_text.replace(" ", "")
        if compact[0] not in "+-":
            raise ValueError(f'{label}: "{val}": the step needs a sign, e.g. (+{compact}) or (-{compact})')
        step = Fraction(compact)
    if step == 0:
        raise ValueError(f'{label}: "{val}": the step is zero')
    if (end - start) * step < 0:
        raise ValueError(f'{label}: "{val}": a step of {format_number(float(step))} never reaches '
                         f'{format_number(float(end))} from {format_number(float(start))}')
    n = math.floor((end - start) / step) + 1
    if n > MAX_VALUES:
        raise ValueError(f'{label}: "{val}" gives {n} values; at most {MAX_VALUES}')
    return [start + i * step for i in range(n)]


def _spaced(start: Fraction, end: Fraction, n: int) -> list[Fraction]:
    if n <= 0:
        return []
    if n == 1:
        return [start]
    return [start + (end - start) * i / (n - 1) for i in range(n)]


def parse_values(text: str, kind: str, label: str = "value") -> list[Any]:
    """Expand an axis's text into its values, in the built-in xyz_grid grammar, exactly."""
    out: list[Any] = []
    for val in split_csv(text):
        if kind == "float":
            m, mc = _RE_DEC_STEP.fullmatch(val), _RE_DEC_COUNT.fullmatch(val)
            if m is not None:
                out += [float(v) for v in _stepped(label, val, _frac(m.group(1)), _frac(m.group(2)), m.group(3))]
            elif mc is not None:
                n = _count(label, val, mc.group(3))
                out += [float(v) for v in _spaced(_frac(mc.group(1)), _frac(mc.group(2)), n)]
            else:
                out.append(coerce_value(val, kind, label))
        elif kind == "int":
            m, mc = _RE_INT_STEP.fullmatch(val), _RE_INT_COUNT.fullmatch(val)
            if m is not None:
                out += [int(v) for v in _stepped(label, val, _frac(m.group(1)), _frac(m.group(2)), m.group(3))]
            elif mc is not None:
                n = _count(label, val, mc.group(3))
                # int() truncates toward zero like the built-in int(np.linspace(...)), minus float error
                out += [int(v) for v in _spaced(_frac(mc.group(1)), _frac(mc.group(2)), n)]
            else:
                out.append(coerce_value(val, kind, label))
        else:
            out.append(coerce_value(val, kind, label))
        if len(out) > MAX_VALUES:
            raise ValueError(f"{label}: more than {MAX_VALUES} values")
    return out


def coerce_value(value: Any, kind: str, label: str = "value") -> Any:
    """One value as float / int / bool / canonical method name; idempotent."""
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError(f'{label}: "{value}" is not a number')
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(_frac(str(value))) if _looks_decimal(str(value)) else float(str(value).strip())
        except (ValueError, ZeroDivisionError):
            raise ValueError(f'{label}: cannot read "{value}" as a number') from None
    if kind == "int":
        if isinstance(value, bool):
            raise ValueError(f'{label}: "{value}" is not a whole number')
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            if value.is_integer():
                return int(value)
            raise ValueError(f'{label}: "{format_number(value)}" is not a whole number')
        text = str(value).strip().replace(" ", "")
        try:
            return int(text)
        except ValueError:
            raise ValueError(f'{label}: cannot read "{value}" as a whole number') from None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f'{label}: "{value}" is not True or False')
    if kind == "rescale":
        text = str(value).strip().lower()
        if text not in RESCALES:
            raise ValueError(f'{label}: "{value}" is not one of {", ".join(RESCALES)}')
        return text
    if kind == "method":
        try:
            return get_method(str(value)).name
        except KeyError:
            raise ValueError(f'{label}: unknown method "{value}"; choose one of {", ".join(METHODS)}') from None
    raise ValueError(f"unknown axis kind {kind!r}")


_DECIMAL = re.compile(r"[+-]?\s*(\d+(\.\d*)?|\.\d+)")


def _looks_decimal(text: str) -> bool:
    return _DECIMAL.fullmatch(text.strip()) is not None


def confirm_values(spec: AxisSpec, values: Iterable[Any]) -> None:
    """Raise ValueError naming the first value the recipe would refuse."""
    for value in values:
        v = spec.coerce(value)
        if spec.knob is not None:
            try:
                check_range(spec.knob, v)
            except ParameterError as exc:
                raise ValueError(f'{spec.label} value "{format_number(v)}" refused: {exc}') from None
        elif spec.kind == "int" and not 0 <= v <= MAX_SEED:
            raise ValueError(f'{spec.label} value "{v}" refused: the merge seed must be an integer '
                             f"in [0, {MAX_SEED}]")


# ----------------------------------------------------------------------------- recipes

def with_override(overrides: Mapping[str, Any] | None, field: str, value: Any) -> dict[str, Any]:
    """A new overrides dict with one more knob (``xyz_grid`` copies ``p`` shallowly per cell,
    so the dict on a cell's ``p`` must never be mutated in place)."""
    out = dict(overrides or {})
    out[field] = AXES_BY_FIELD[field].coerce(value) if field in AXES_BY_FIELD else value
    return out


def apply_overrides(recipe: MergeRecipe, overrides: Mapping[str, Any] | None) -> MergeRecipe:
    """The recipe a cell merges: the section's (or tab's) recipe with the axis values put in.

    A method on an axis keeps the knobs the user set explicitly and takes the
    preset for the others (``MergeRecipe.resolved`` fills unset knobs).
    """
    if not overrides:
        return recipe
    known = {k: v for k, v in overrides.items() if k in AXES_BY_FIELD}
    return replace(recipe, **known)


# ----------------------------------------------------------------------------- infotext

INFOTEXT_KEYS: dict[str, str] = {
    "method": "DARE method", "p": "DARE p", "k": "DARE k", "alpha": "DARE alpha", "lam": "DARE lambda",
    "vote_sgn": "DARE vote_sgn", "seed": "DARE seed", "alpha_unet": "DARE alpha UNet",
    "alpha_te": "DARE alpha TE", "merge": "DARE merge", "weights": "DARE weights",
    "block_alpha": "DARE block alpha", "block_p": "DARE block p", "block_k": "DARE block k",
    "vae": "DARE VAE", "epsilon": "DARE epsilon", "beta": "DARE beta", "rescale": "DARE rescale",
}
INFOTEXT_BASE = "DARE base"
INFOTEXT_MODELS = "DARE models"
INFOTEXT_HASH = "DARE hash"
_INFOTEXT_FIELD = {v: k for k, v in INFOTEXT_KEYS.items()}


def _stem(path: str) -> str:
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def recipe_infotext(recipe: MergeRecipe, recipe_hash: str | None = None) -> dict[str, str]:
    """The ``extra_generation_params`` entries that describe a merge (every knob, resolved).

    Values are plain strings; the WebUI quotes the ones holding commas.
    Optional knobs appear only when set, so an ordinary merge adds a short line.
    """
    r = recipe.resolved()
    spec = r.spec
    out: dict[str, str] = {INFOTEXT_KEYS["method"]: r.method}
    for field in ("p", "k", "alpha", "lam"):
        out[INFOTEXT_KEYS[field]] = format_number(getattr(r, field))
    out[INFOTEXT_KEYS["vote_sgn"]] = str(bool(r.vote_sgn))
    out[INFOTEXT_KEYS["seed"]] = str(r.seed)
    for field in ("alpha_unet", "alpha_te", "epsilon", "beta"):
        if getattr(r, field) is not None:
            out[INFOTEXT_KEYS[field]] = format_number(getattr(r, field))
    if r.rescale != "uniform":
        out[INFOTEXT_KEYS["rescale"]] = r.rescale
    if r.merge != spec.default_merge:
        out[INFOTEXT_KEYS["merge"]] = r.merge
    if any(w != 1.0 for w in r.weights):
        out[INFOTEXT_KEYS["weights"]] = ", ".join(format_number(w) for w in r.weights)
    for field in ("block_alpha", "block_p", "block_k"):
        if getattr(r, field):
            out[INFOTEXT_KEYS[field]] = ", ".join(getattr(r, field).replace(",", " ").split())
    if r.vae != "base":
        out[INFOTEXT_KEYS["vae"]] = r.vae
    out[INFOTEXT_BASE] = _stem(r.base)
    out[INFOTEXT_MODELS] = join_csv(_stem(m) for m in r.models)
    if recipe_hash:
        out[INFOTEXT_HASH] = recipe_hash
    return out


def has_recipe(params: Mapping[str, Any]) -> bool:
    return INFOTEXT_KEYS["method"] in params


def recipe_fields_from_infotext(params: Mapping[str, Any]) -> dict[str, Any]:
    """Recipe knobs read back from pasted infotext (typed; names of base/models as written).

    Returns ``{}`` when the infotext holds no merge.  Raises ValueError naming
    a value that cannot be read.
    """
    if not has_recipe(params):
        return {}
    out: dict[str, Any] = {}
    for key, raw in params.items():
        field = _INFOTEXT_FIELD.get(key)
        if field is None:
            continue
        text = str(raw).strip()
        if field in AXES_BY_FIELD:
            out[field] = AXES_BY_FIELD[field].coerce(text)
        elif field == "weights":
            out[field] = [coerce_value(w, "float", key) for w in split_csv(text)]
        elif field.startswith("block_"):
            out[field] = ",".join(text.replace(",", " ").split())
        else:
            out[field] = text
    if INFOTEXT_BASE in params:
        out["base"] = str(params[INFOTEXT_BASE]).strip()
    if INFOTEXT_MODELS in params:
        out["models"] = split_csv(str(params[INFOTEXT_MODELS]))
    if INFOTEXT_HASH in params:
        out["recipe_hash"] = str(params[INFOTEXT_HASH]).strip()
    return out


def resolve_names(names: Iterable[str], titles: Iterable[str],
                  to_path: Callable[[str], str] | None = None) -> list[str | None]:
    """Match names from infotext (file stems) to checkpoint titles; None where none matches."""
    titles = list(titles)
    out: list[str | None] = []
    for name in names:
        hit = None
        for title in titles:
            stem = _stem(title.split(" [", 1)[0])
            if stem == name or title == name or stem.rsplit("/", 1)[-1] == name:
                hit = title
                break
        out.append(to_path(hit) if (hit is not None and to_path is not None) else hit)
    return out


__all__ = ["AxisSpec", "AXES", "AXES_BY_LABEL", "AXES_BY_FIELD", "LABEL_PREFIX", "parse_values", "coerce_value",
           "confirm_values", "split_csv", "format_number", "with_override", "apply_overrides",
           "recipe_infotext", "recipe_fields_from_infotext", "has_recipe", "resolve_names", "INFOTEXT_KEYS",
           "INFOTEXT_BASE", "INFOTEXT_MODELS", "INFOTEXT_HASH"]
