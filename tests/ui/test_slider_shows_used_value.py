"""The tab shows the knob values the merge uses: a value typed past a slider's end is shown clamped at once.

Before: typing 1 into p's box (and pressing Enter) left "1" on screen until the box lost focus, while
the page already held 0.99 and merged with it.  The browser test drives the real standalone tab
(gradio 3.41, and 4.40 when a gradio-4 python is configured); the other tests need no browser.
"""
from __future__ import annotations

import time

import pytest

from lib_merge.recipe import RANGES, MergeRecipe, check_range
from lib_merge.ui.form import SLIDER_RANGES, clamp_knob
from lib_merge.ui.texts import used_text


@pytest.mark.parametrize("knob", sorted(SLIDER_RANGES))
def test_slider_ends_are_values_the_merge_accepts(knob):
    lo, hi = SLIDER_RANGES[knob]
    name = "alpha" if knob.startswith("alpha") else knob
    check_range(name, lo)
    check_range(name, hi)
    r_lo, r_hi, lo_in, hi_in = RANGES[name]
    assert (lo == r_lo) == lo_in and (hi == r_hi) == hi_in   # an open end is the nearest 0.01 step inside


@pytest.mark.parametrize("knob,typed,shown", [("p", 1, 0.99), ("p", "1.5", 0.99), ("p", -0.2, 0.0),
                                              ("k", 0, 0.01), ("lam", 7, 2.0), ("alpha", -3, -1.0),
                                              ("p", 0.5, None), ("p", "0.", None), ("p", "", None),
                                              ("p", None, None)])
def test_clamp_knob(knob, typed, shown):
    assert clamp_knob(knob, typed) == shown


def test_used_text_names_the_values_the_merge_used():
    recipe = MergeRecipe(method="dare_ties_soup", base="b.safetensors", models=["m1", "m2"], p=0.99, seed=7,
                         weights=[1.0, 0.5])
    assert used_text(recipe) == ("used: p 0.99, k 1, alpha 0.5, λ 1, vote_sgn on, seed 7, mean, "
                                 "weights 1, 0.5")


def _wait_shown(ui, elem: str, value: float, timeout: float = 20.0) -> None:
    """Wait until the number box shows ``value`` while it still has the focus (no blur in between)."""
    page = ui.page
    deadline = time.monotonic() + timeout
    while True:
        shown = ui.number(elem)
        focused = page.evaluate(f"document.activeElement === document.querySelector('#{elem} input[type=number]')")
        assert focused, "the number box lost the focus: the page's own clamp-on-blur would hide the defect"
        try:
            if abs(float(shown) - value) < 1e-9:
                return
        except ValueError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"#{elem} shows {shown!r} while the merge would use {value}")
        page.wait_for_timeout(100)


@pytest.mark.browser
def test_typed_value_past_the_slider_end_is_shown_clamped(server, tab_page):
    ui = tab_page.open(server.url)
    for elem, typed, used in (("dare_merge_p", "1", 0.99), ("dare_merge_k", "0", 0.01),
                              ("dare_merge_lambda", "5", 2.0)):
        box = ui.page.locator(f"#{elem} input[type=number]").first
        box.fill(typed)
        box.press("Enter")
        _wait_shown(ui, elem, used)
        assert ui.page.input_value(f"#{elem} input[type=range]") == f"{used:g}"
    # values inside the range are left as typed
    box = ui.page.locator("#dare_merge_p input[type=number]").first
    box.fill("0.42")
    box.press("Enter")
    ui.page.wait_for_timeout(1500)
    assert ui.number("dare_merge_p") == "0.42"
