"""X/Y/Z axes of the merge knobs: parsing in the WebUI's grammar without float drift, range checks, infotext."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from lib_merge.methods import METHODS
from lib_merge.recipe import RANGES, MergeRecipe
from lib_merge.xyz_axes import (AXES, AXES_BY_FIELD, AXES_BY_LABEL, apply_overrides, coerce_value, format_number,
                                parse_values, recipe_fields_from_infotext, recipe_infotext, resolve_names,
                                with_override)

P = AXES_BY_LABEL["[DARE] p"]
SEED = AXES_BY_LABEL["[DARE] seed"]


# ----------------------------------------------------------------------------- the axis table

def test_labels_fields_and_kinds():
    assert [a.label for a in AXES] == ["[DARE] p", "[DARE] k", "[DARE] alpha", "[DARE] lambda", "[DARE] vote_sgn",
                                       "[DARE] seed", "[DARE] method", "[DARE] alpha UNet", "[DARE] alpha TE",
                                       "[DARE] epsilon", "[DARE] beta", "[DARE] rescale"]
    fields = {f for f in MergeRecipe.__dataclass_fields__}
    for axis in AXES:
        assert axis.field in fields, axis
        if axis.knob is not None:
            assert axis.knob in RANGES
    assert AXES_BY_FIELD["lam"].knob == "lam"
    assert AXES_BY_LABEL["[DARE] method"].choices == list(METHODS)
    assert AXES_BY_LABEL["[DARE] vote_sgn"].choices == ["False", "True"]
    assert P.choices is None


def _outer_axis(costs: list[float]) -> int:
    """xyz_grid's rule (scripts/xyz_grid.py, A1111 1.10 and Forge): the strictly highest cost loops outermost,
    otherwise Z (index 2)."""
    for i in range(3):
        if all(costs[i] > costs[j] for j in range(3) if j != i):
            return i
    return 2


def test_costs_put_any_merge_axis_outside_seed_and_checkpoint_axes():
    costs = [a.cost for a in AXES]
    assert len(set(costs)) == len(costs), "equal costs would let a cheap Z axis run outermost"
    assert min(costs) > 1.0  # above the built-in "Checkpoint name"
    for a in AXES:
        for b in AXES:
            if a is b:
                continue
            # X = a, Y = b, Z = the built-in Seed (cost 0): a merge axis is outermost, never the seed
            assert _outer_axis([a.cost, b.cost, 0.0]) in (0, 1)


# ----------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("text,expected", [
    ("0.1-0.9 (+0.2)", [0.1, 0.3, 0.5, 0.7, 0.9]),
    ("0.1-0.9 [5]", [0.1, 0.3, 0.5, 0.7, 0.9]),
    ("0.2, 0.4,0.6", [0.2, 0.4, 0.6]),
    ("0 - 1 (+0.25)", [0.0, 0.25, 0.5, 0.75, 1.0]),
    ("0.9-0.1 (-0.4)", [0.9, 0.5, 0.1]),
    ("0.5--0.5 (-0.5)", [0.5, 0.0, -0.5]),
    ("-0.5, 1e-3, .5", [-0.5, 0.001, 0.5]),
    ("0-1 [4]", [0.0, 1 / 3, 2 / 3, 1.0]),
    ("0.3-0.3 [1]", [0.3]),
    ("0.1-0.2 [0]", []),
    ("0.1, , 0.2", [0.1, 0.2]),
    ('"0.1-0.3 (+0.1)", 0.7', [0.1, 0.2, 0.3, 0.7]),
])
def test_float_values_are_what_was_typed(text, expected):
    values = parse_values(text, "float")
    # exact equality with the float of the decimal the user meant: no 0.30000000000000004
    assert values == expected
    assert all(type(v) is float for v in values)


def test_float_ranges_match_the_builtin_where_it_does_not_drift():
    """Same grammar and same values as xyz_grid's np.arange / np.linspace, up to their rounding error."""
    for start, end, step in [(0.1, 0.9, 0.2), (0.0, 1.0, 0.1), (0.5, 2.0, 0.5), (1.0, 0.0, -0.25)]:
        text = f"{start}-{end} ({'+' if step > 0 else ''}{step})"
        builtin = np.arange(start, end + step, step).tolist()
        builtin = [b for b in builtin if (b <= end + 1e-9 if step > 0 else b >= end - 1e-9)]
        assert parse_values(text, "float") == pytest.approx(builtin, abs=1e-12), text
    for start, end, num in [(0.1, 0.9, 5), (0.0, 1.0, 7), (-1.0, 2.0, 4)]:
        builtin = np.linspace(start, end, num).tolist()
        assert parse_values(f"{start}-{end} [{num}]", "float") == pytest.approx(builtin, abs=1e-12)


def test_float_drift_and_overshoot_of_the_builtin_are_gone():
    assert np.arange(0.1, 0.9 + 0.2, 0.2).tolist()[1] != 0.3   # the built-in's drift this module avoids
    assert parse_values("0.1-0.9 (+0.2)", "float")[1] == 0.3
    assert max(np.arange(0.0, 1.0 + 0.3, 0.3).tolist()) > 1.0  # the built-in overshoots the end ...
    assert parse_values("0-1 (+0.3)", "float") == [0.0, 0.3, 0.6, 0.9]  # ... this stops at it
    assert format_number(parse_values("0.1-0.9 [5]", "float")[3]) == "0.7"


@pytest.mark.parametrize("text,expected", [
    ("1-5 (+2)", [1, 3, 5]),
    ("1-10 [5]", [1, 3, 5, 7, 10]),     # int(np.linspace(1, 10, 5)) truncates 3.25, 5.5, 7.75
    ("10-1 (-3)", [10, 7, 4, 1]),       # the built-in's range(10, 2, -3) would drop the 1
    ("3-1", [3, 2, 1]),
    ("7, 42,0", [7, 42, 0]),
    ("0 - 4 (+2)", [0, 2, 4]),
])
def test_int_values(text, expected):
    assert parse_values(text, "int") == expected
    if "[" in text:
        m = re.fullmatch(r"(\d+)-(\d+) \[(\d+)\]", text)
        assert expected == [int(x) for x in np.linspace(int(m[1]), int(m[2]), int(m[3])).tolist()]


@pytest.mark.parametrize("kind,text,needle", [
    ("float", "0.1-0.9 (0.2)", '"0.1-0.9 (0.2)": the step needs a sign'),
    ("float", "0.1-0.9 (-0.2)", "never reaches 0.9"),
    ("float", "0.1-0.9 (+0)", "the step is zero"),
    ("float", "zero point five", 'cannot read "zero point five"'),
    ("float", "1-2-3", 'cannot read "1-2-3"'),
    ("float", "0-1 (+0.0001)", "at most 1000"),
    ("float", "0-1 [2.5]", "whole number"),
    ("int", "1.5", 'cannot read "1.5" as a whole number'),
    ("int", "1-5 (-1)", "never reaches 5"),
])
def test_bad_values_are_named(kind, text, needle):
    with pytest.raises(ValueError) as err:
        parse_values(text, kind, "[DARE] x")
    assert needle in str(err.value)
    assert str(err.value).startswith("[DARE] x")


def test_bool_and_method_values():
    assert parse_values("True, off, 1, no", "bool") == [True, False, True, False]
    with pytest.raises(ValueError, match='"maybe" is not True or False'):
        parse_values("maybe", "bool")
    assert parse_values("TIES, dare-ties, task_arithmetic", "method") == ["ties", "dare_ties", "add_difference"]
    with pytest.raises(ValueError, match='unknown method "magic"'):
        coerce_value("magic", "method")
    # idempotent: xyz_grid applies ``type`` again to values ``prepare`` already parsed
    for axis in AXES:
        values = {"float": [0.3], "int": [7], "bool": [True], "method": ["ties"],
                  "rescale": ["unbiased"]}[axis.kind]
        assert [axis.coerce(v) for v in values] == values


# ----------------------------------------------------------------------------- confirm

@pytest.mark.parametrize("label,bad,good", [
    ("[DARE] p", [1.0, -0.1], [0.0, 0.99]),
    ("[DARE] k", [0.0, 1.5], [0.01, 1.0]),
    ("[DARE] lambda", [2.5, -1.0], [0.0, 2.0]),
    ("[DARE] alpha", [2.1, -1.5], [-1.0, 2.0]),
    ("[DARE] alpha UNet", [3.0], [0.5]),
    ("[DARE] alpha TE", [-2.0], [1.5]),
])
def test_confirm_refuses_out_of_range_naming_the_value(label, bad, good):
    axis = AXES_BY_LABEL[label]
    axis.confirm(good)
    for value in bad:
        with pytest.raises(ValueError) as err:
            axis.confirm(good + [value])
        message = str(err.value)
        assert message.startswith(f'{label} value "{format_number(value)}" refused')
        assert "outside" in message


def test_confirm_parsed_range_end_to_end_and_seed():
    values = parse_values("0.5-1.1 (+0.3)", "float")
    assert values == [0.5, 0.8, 1.1]
    with pytest.raises(ValueError, match=r'\[DARE\] p value "1.1" refused: p \(DARE drop rate\) = 1.1 is outside'):
        P.confirm(values)
    SEED.confirm([0, 42, 2**40])
    with pytest.raises(ValueError, match=r'\[DARE\] seed value "-1" refused'):
        SEED.confirm(parse_values("-1, 3", "int"))


def test_nan_is_refused():
    with pytest.raises(ValueError, match="refused"):
        AXES_BY_LABEL["[DARE] alpha"].confirm([float("nan")])


# ----------------------------------------------------------------------------- overrides

def test_overrides_never_mutate_and_apply_to_the_recipe():
    base = MergeRecipe("dare_ties", "b.safetensors", ["m.safetensors"], p=0.2, alpha=0.8)
    first = with_override(None, "p", "0.5")
    second = with_override(first, "alpha", 1.5)
    assert first == {"p": 0.5}           # the per-cell copy of p must not leak into the others
    assert second == {"p": 0.5, "alpha": 1.5}
    cell = apply_overrides(base, second)
    assert (cell.p, cell.alpha, cell.k) == (0.5, 1.5, None) and (base.p, base.alpha) == (0.2, 0.8)
    assert apply_overrides(base, {}) is base
    # a method axis keeps what the user set and takes the preset for the rest
    soup = apply_overrides(base, {"method": "dare_ties_soup"}).resolved()
    assert (soup.p, soup.alpha, soup.vote_sgn) == (0.2, 0.8, True)
    assert cell.recipe_hash() != base.recipe_hash()


# ----------------------------------------------------------------------------- infotext

# The WebUI's own infotext grammar (modules/infotext_utils.py, A1111 1.10): key: value pairs joined by
# ", ", values holding a comma/colon JSON-quoted, parsed back with this regex.
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _webui_roundtrip(params: dict[str, str]) -> dict[str, str]:
    def quote(text):
        return json.dumps(text) if ("," in text or ":" in text or "\n" in text) else text
    line = "Steps: 2, Sampler: Euler, " + ", ".join(f"{k}: {quote(v)}" for k, v in params.items())
    out = {}
    for key, value in _RE_PARAM.findall(line):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        out[key] = value
    return out


def fields_models(parsed):
    return recipe_fields_from_infotext(parsed)["models"]


def test_infotext_roundtrip_through_the_webui_grammar():
    recipe = MergeRecipe("dare_ties", "/m/sub/base.safetensors", ["/m/a.safetensors", "/m/b, c.safetensors"],
                         p=0.30000000000000004, alpha=0.7, alpha_te=0.25, seed=7, weights=[1.0, 0.5],
                         block_alpha=",".join(["0.5"] * 26))
    info = recipe_infotext(recipe, "abcdef0123")
    assert info["DARE p"] == "0.3" and info["DARE alpha"] == "0.7" and info["DARE alpha TE"] == "0.25"
    assert "DARE alpha UNet" not in info
    parsed = _webui_roundtrip(info)
    assert fields_models(parsed) == ["a", "b, c"]
    fields = recipe_fields_from_infotext(parsed)
    r = recipe.resolved()
    assert fields["method"] == "dare_ties"
    assert (fields["p"], fields["k"], fields["alpha"], fields["lam"]) == (0.3, r.k, 0.7, r.lam)
    assert fields["vote_sgn"] is False and fields["seed"] == 7 and fields["alpha_te"] == 0.25
    assert fields["weights"] == [1.0, 0.5]
    assert fields["block_alpha"] == recipe.block_alpha
    assert fields["base"] == "base" and fields["recipe_hash"] == "abcdef0123"
    assert recipe_fields_from_infotext({"Steps": "2"}) == {}


def test_infotext_models_with_plain_names_and_resolution():
    recipe = MergeRecipe("ties", "base.safetensors", ["one.safetensors", "two.ckpt"])
    fields = recipe_fields_from_infotext(_webui_roundtrip(recipe_infotext(recipe)))
    assert fields["models"] == ["one", "two"]
    titles = ["base.safetensors [1234567890]", "one.safetensors [aaaa]", "sub/two.ckpt"]
    assert resolve_names(fields["models"] + ["missing"], titles) == ["one.safetensors [aaaa]", "sub/two.ckpt", None]
