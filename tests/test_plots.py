"""The analysis plots (issue 13): drawn from real ``analyze()`` output on synthetic checkpoints, and from
edge cases (one model, a hundred, SDXL's blocks + VAE, nulls) that real files rarely give.

Each PNG is decoded (PIL) to check it is a picture of a sane size, not just some bytes.
"""
from __future__ import annotations

import io
import json
import os
import threading

import pytest

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402  (comes with matplotlib)

from lib_merge.analysis import plots  # noqa: E402
from lib_merge.arch import block_labels  # noqa: E402
from lib_merge.errors import MergeError  # noqa: E402


def _png_size(path_or_bytes) -> tuple[int, int]:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else open(path_or_bytes, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.size


def _sane(size: tuple[int, int]) -> None:
    width, height = size
    assert 400 <= width <= 2000 and 200 <= height <= 1500, size


def _made_up(n: int, arch: str = "sd1", method: bool = True, vae: bool = True) -> dict:
    """An analysis in the schema's shape with simple numbers (for shapes real files cannot cheaply give)."""
    blocks = block_labels(arch) + (["VAE"] if vae else [])
    models = [f"fine-tune number {i} with a long file name.safetensors" for i in range(n)]
    out = {"version": 1, "arch": arch, "base": "base.safetensors", "models": models, "blocks": blocks,
           "delta_norm": {m: {b: (i + 1) * (j + 1) / 10 for j, b in enumerate(blocks)} for i, m in enumerate(models)},
           "whole_norm": {m: 1.0 for m in models},
           "cosine": [[1.0 if i == j else 0.5 for j in range(n)] for i in range(n)],
           "sign_conflict": {b: (None if b == "VAE" else j / len(blocks)) for j, b in enumerate(blocks)}}
    if method:
        out.update(method="ties", share={m: {b: 1.0 / n for b in blocks} for m in models},
                   kept={m: {b: 0.2 for b in blocks} for m in models},
                   elected_agreement={b: 0.75 for b in blocks})
    return out


@pytest.fixture(scope="module")
def real_analysis(sd1_set) -> dict:
    """analyze() of three synthetic SD1 fine-tunes with TIES (k 0.3): the merge's numbers included."""
    from lib_merge.analysis import analyze
    from lib_merge.recipe import MergeRecipe
    recipe = MergeRecipe(method="ties", base=sd1_set["base"], models=sd1_set["models"], k=0.3)
    return analyze(sd1_set["base"], sd1_set["models"], recipe, device="cpu")


def test_plots_of_a_real_analysis_are_written_as_pictures(real_analysis, tmp_path):
    assert json.loads(json.dumps(real_analysis)) == real_analysis   # plain JSON, as the CLI writes it
    paths = plots.write_plots(real_analysis, str(tmp_path / "plots"))
    names = [os.path.basename(p) for p in paths]
    assert names == ["1-norms.png", "2-cosine.png", "3-conflict.png", "4-share.png", "5-kept.png"]
    for path in paths:
        assert os.path.getsize(path) > 10_000   # a drawn figure, not an empty canvas
        _sane(_png_size(path))
    text = plots.summary_text(real_analysis)
    assert text.startswith("3 models over") and "biggest change" in text and "largest share" in text, text


def test_inputs_only_analysis_draws_no_merge_plots(sd1_set, tmp_path):
    from lib_merge.analysis import analyze
    analysis = analyze(sd1_set["base"], sd1_set["models"][:1], None, device="cpu")
    paths = plots.write_plots(analysis, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["1-norms.png", "2-cosine.png", "3-conflict.png"]
    assert "share" not in plots.summary_text(analysis)


@pytest.mark.parametrize("n,arch", [(1, "sd1"), (4, "sdxl"), (100, "sdxl")])
def test_any_number_of_models_gives_readable_pictures(n, arch):
    analysis = _made_up(n, arch)
    pngs = plots.render_pngs(analysis)
    assert list(pngs) == list(plots.PLOT_ORDER)
    for name, data in pngs.items():
        _sane(_png_size(data))
    figs = plots.figures(analysis, ["norms", "cosine", "share"])
    ticks = [t.get_text() for t in figs["norms"].axes[0].get_yticklabels()]
    assert 1 <= len(ticks) <= plots.MAX_TICKS and all(len(t) <= plots.MAX_NAME for t in ticks)
    blocks = [t.get_text() for t in figs["norms"].axes[0].get_xticklabels()]
    assert blocks == analysis["blocks"] and blocks[-1] == "VAE" and len(blocks) == (21 if arch == "sdxl" else 27)
    legend = figs["share"].axes[0].get_legend()
    assert len(legend.get_texts()) == min(n, plots.MAX_LEGEND)
    if n > plots.MAX_LEGEND:
        assert legend.get_texts()[-1].get_text() == f"{n - plots.MAX_LEGEND + 1} others"


def test_nulls_are_drawn_as_missing_not_as_zero_or_an_error():
    analysis = _made_up(2)
    analysis["cosine"] = [[None, None], [None, 1.0]]            # an all-zero task vector
    analysis["share"][analysis["models"][0]]["IN03"] = None
    analysis["sign_conflict"] = {b: None for b in analysis["blocks"]}
    analysis["elected_agreement"] = {b: None for b in analysis["blocks"]}
    for data in plots.render_pngs(analysis).values():
        _sane(_png_size(data))
    assert "sign conflict" not in plots.summary_text(analysis)


def test_bad_analysis_is_one_line():
    with pytest.raises(MergeError, match="'models' must be a non-empty list"):
        plots.write_plots({"models": [], "blocks": ["BASE"]}, "/nonexistent")
    bad = _made_up(3)
    bad["cosine"] = [[1.0]]
    with pytest.raises(MergeError, match="'cosine' must be a 3 x 3"):
        plots.render_pngs(bad)


def test_unwritable_folder_names_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MergeError) as info:
        plots.write_plots(_made_up(1), str(blocker / "plots"))
    assert str(blocker) in str(info.value) and "\n" not in str(info.value)


def test_drawing_leaves_pyplot_alone_and_runs_on_threads():
    """No global figure state: a WebUI's own matplotlib use is undisturbed, and two tabs may draw at once."""
    import matplotlib
    import matplotlib.pyplot as plt
    backend = matplotlib.get_backend()
    before = plt.get_fignums()
    errors: list[BaseException] = []

    def draw() -> None:
        try:
            plots.render_pngs(_made_up(3))
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=draw) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    assert plt.get_fignums() == before and matplotlib.get_backend() == backend


def test_a_merges_own_statistics_draw_share_kept_and_agreement(sd1_set, tmp_path):
    """What the tab draws after a Merge: the stats the merge gathered (no input figures) -> direction (the
    agreement line only), share and kept."""
    from lib_merge.recipe import MergeRecipe
    from lib_merge.session import MergeSession
    recipe = MergeRecipe(method="dare_ties", base=sd1_set["base"], models=sd1_set["models"][:2], p=0.3, k=0.5)
    stats = MergeSession(str(tmp_path)).merge(recipe, device="cpu", hot_load=False, stats=True).report.stats
    assert plots.available(stats) == ["conflict", "share", "kept"]
    fig = plots.conflict_figure(stats)
    ax = fig.axes[0]
    assert not ax.patches and len(ax.lines) == 1      # no empty conflict bars, one agreement line
    for data in plots.render_pngs(stats).values():
        _sane(_png_size(data))
    assert "largest share" in plots.summary_text(stats)
