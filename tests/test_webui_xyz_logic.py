"""lib_merge.webui without a WebUI: the recipe for an X/Y/Z cell, the overrides, the after-grid choice,
the hot-loaders' shared write-or-roll-back, and the import arrows of the package.

The merges here are real (synthetic SD1 checkpoints on disk, merged on the CPU
by a real ``MergeSession``); only the WebUI's running model is replaced by
:class:`MemoryLoader`, which keeps the loaded state dict, and its checkpoint
list by a title -> file map.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import lib_merge.webui as dare_merge
from lib_merge.errors import MergeError, ParameterError
from lib_merge.session import MergeSession
from lib_merge.webui import host, hotload_base, xyz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEBUI_DIR = os.path.join(ROOT, "lib_merge", "webui")


class MemoryLoader:
    """A HotLoader whose "running model" is the last state dict it was given."""

    def __init__(self) -> None:
        self.loaded: tuple[str, str] | None = None      # (name, recipe hash); None: the original checkpoint
        self.loads = 0
        self.restores = 0

    def load(self, state, name, recipe_hash, recipe) -> None:
        self.loaded = (name, recipe_hash)
        self.loads += 1

    def restore(self) -> str:
        self.loaded = None
        self.restores += 1
        return "original.safetensors"

    def loaded_recipe_hash(self):
        return None if self.loaded is None else self.loaded[1]


@pytest.fixture()
def webui(sd1_set, monkeypatch):
    """A real session over sd1_set with a MemoryLoader, and titles "base"/"ft1".."ft3" for its files."""
    paths = {"base": sd1_set["base"], **{f"ft{i}": m for i, m in enumerate(sd1_set["models"], 1)}}

    def find_checkpoint(title):
        if title not in paths:
            raise MergeError("no such checkpoint in the WebUI's list (refresh it?)", title)
        return SimpleNamespace(filename=paths[title], title=title)

    loader = MemoryLoader()
    session = MergeSession(sd1_set["dir"], hot_loader=loader, device="cpu")
    monkeypatch.setattr(host, "find_checkpoint", find_checkpoint)
    monkeypatch.setattr(dare_merge, "_session", session)
    monkeypatch.setattr(xyz, "_grid", None)
    monkeypatch.setattr(xyz, "_tab_recipe", None)
    monkeypatch.setattr(xyz, "_own_hashes", type(xyz._own_hashes)(maxlen=512))
    monkeypatch.setattr(xyz, "_last_grid", {})
    return SimpleNamespace(session=session, loader=loader, paths=paths)


def section_args(**values) -> list:
    merged = dict(xyz.DEFAULTS, **values)
    return [merged[name] for name in xyz.SECTION_ARGS]


def cell(args=(), overrides=None, in_script_args=True):
    """A processing object as xyz_grid hands it to the section: axis values on it, section args inside."""
    section = SimpleNamespace(dare_merge_section=True, args_from=2, args_to=2 + len(args))
    p = SimpleNamespace(scripts=SimpleNamespace(alwayson_scripts=[SimpleNamespace(), section]),
                        script_args=["other", "script", *args] if in_script_args else [],
                        extra_generation_params={"Steps": 20})
    if overrides is not None:
        setattr(p, xyz.XYZ_ATTR, overrides)
    return p


# ----------------------------------------------------------------------------- imports

def test_imports_without_a_webui():
    code = ("import sys, lib_merge.webui.xyz, lib_merge.webui.xyz_cache, lib_merge.webui.xyz_section, "
            "lib_merge.webui.hotload_base, lib_merge.webui.hotload_a1111, lib_merge.webui.hotload_forge, "
            "lib_merge.webui.api; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('modules', 'modules_forge', 'backend', "
            "'gradio')); print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _sibling_imports(name: str) -> set[str]:
    """The lib_merge.webui modules ``name`` imports, at the top or inside functions."""
    tree = ast.parse(open(os.path.join(WEBUI_DIR, name + ".py"), encoding="utf-8").read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 2 and node.module == "webui":
            out.add("__init__")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lib_merge.webui."):
            out.add(node.module.split(".")[2])
    return out


def test_hot_load_arrows_run_one_way():
    """loaders -> hotload_base -> host; only the package picks a loader (issue 14: no import circle)."""
    assert not os.path.exists(os.path.join(WEBUI_DIR, "hotload.py"))
    assert _sibling_imports("host") == set()
    assert _sibling_imports("hotload_base") == {"host"}
    for loader in ("hotload_a1111", "hotload_forge"):
        assert _sibling_imports(loader) == {"host", "hotload_base"}, loader
    users = [f[:-3] for f in os.listdir(WEBUI_DIR) if f.endswith(".py")
             if {"hotload_a1111", "hotload_forge"} & _sibling_imports(f[:-3])]
    assert users == ["__init__"]
    for name in ("xyz", "xyz_cache", "xyz_section"):
        assert not {"hotload_a1111", "hotload_forge", "hotload_base"} & _sibling_imports(name), name


def test_script_file_only_wires():
    """scripts/dare_merge_xyz.py: the Script subclass and callback wiring, no logic of its own."""
    tree = ast.parse(open(os.path.join(ROOT, "scripts", "dare_merge_xyz.py"), encoding="utf-8").read())
    functions = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    assert functions == []
    assert [c.name for c in classes] == ["DareMergeSection"]
    methods = {n.name: n for n in classes[0].body if isinstance(n, ast.FunctionDef)}
    assert set(methods) == {"title", "show", "ui", "before_process"}
    assert all(len(m.body) == 1 for m in methods.values())


# ----------------------------------------------------------------------------- the recipe for a cell

def test_section_values_fill_defaults():
    values = xyz.section_values([True, False, "base", None, "ties"])
    assert values["enabled"] is True and values["base"] == "base" and values["method"] == "ties"
    assert values["models"] == [] and values["p"] == 0.5 and values["seed"] == 42


def test_cell_recipe_off_without_axes_is_nothing(webui):
    assert xyz.cell_recipe(cell(), section_args()) is None
    p = cell()
    xyz.before_process(p, section_args())     # nothing happens: no merge, infotext untouched
    assert p.extra_generation_params == {"Steps": 20}
    assert webui.session.merges_performed == 0


def test_cell_recipe_from_the_section_with_overrides(webui):
    args = section_args(enabled=True, base="base", models=["ft1", "ft2"], method="DARE-TIES", p=0.4, seed=7,
                        weights="1, 0.5", split_alpha=True, alpha_unet=0.8, alpha_te=0.2)
    recipe = xyz.cell_recipe(cell(args), args)
    assert recipe.base == webui.paths["base"]
    assert recipe.models == [webui.paths["ft1"], webui.paths["ft2"]]
    assert (recipe.p, recipe.seed, recipe.weights, recipe.alpha_unet, recipe.alpha_te) == (0.4, 7, [1.0, 0.5], 0.8, 0.2)

    overrides = xyz.with_override(xyz.with_override(None, "p", 0.3), "seed", 9)
    cell_p = cell(args, overrides)
    recipe = xyz.cell_recipe(cell_p, args)
    assert (recipe.p, recipe.seed, recipe.models) == (0.3, 9, [webui.paths["ft1"], webui.paths["ft2"]])
    # the X/Y/Z confirm step reads the section's args from p alone
    assert xyz.recipe_for_grid(cell_p).p == 0.4
    without_split = section_args(enabled=True, base="base", models=["ft1"])
    assert xyz.cell_recipe(cell(without_split), without_split).alpha_unet is None


def test_cell_recipe_refuses_bad_input(webui):
    with pytest.raises(MergeError, match="pick a base"):
        xyz.cell_recipe(cell(), section_args(enabled=True, models=["ft1"]))
    with pytest.raises(MergeError, match="at least one model"):
        xyz.cell_recipe(cell(), section_args(enabled=True, base="base"))
    with pytest.raises(MergeError, match="no such checkpoint"):
        xyz.cell_recipe(cell(), section_args(enabled=True, base="base", models=["nope"]))
    args = section_args(enabled=True, base="base", models=["ft1"])
    with pytest.raises(ParameterError, match=r"p \(DARE drop rate\) = 1.5 is outside"):
        xyz.cell_recipe(cell(args, {"p": 1.5}), args)


def test_axis_without_section_uses_the_tab_recipe(webui):
    # nothing merged in the tab yet: a clear refusal
    with pytest.raises(MergeError, match="nothing to merge"):
        xyz.cell_recipe(cell(overrides={"p": 0.2}), section_args())
    tab = xyz.section_recipe(xyz.section_values(section_args(enabled=True, base="base", models=["ft1", "ft3"])))
    webui.session.merge(tab, dtype="fp16", device="cpu")
    recipe = xyz.cell_recipe(cell(overrides={"p": 0.2}), section_args())
    assert recipe.models == [webui.paths["ft1"], webui.paths["ft3"]] and recipe.p == 0.2
    # "use the tab's recipe" wins over the section's own pickers
    args = section_args(enabled=True, use_tab=True, base="base", models=["ft2"])
    assert xyz.cell_recipe(cell(args), args).models == [webui.paths["ft1"], webui.paths["ft3"]]


def test_tab_recipe_ignores_merges_made_by_cells(webui):
    tab = xyz.section_recipe(xyz.section_values(section_args(enabled=True, base="base", models=["ft1"])))
    webui.session.merge(tab, dtype="fp16", device="cpu")
    assert xyz.tab_recipe() == webui.session.result.recipe
    cell_result = webui.session.merge(xyz.apply_overrides(tab, {"p": 0.1}), dtype="fp16", device="cpu")
    xyz._own_hashes.append(cell_result.recipe_hash)
    assert xyz.tab_recipe().p == tab.resolved().p != 0.1


# ----------------------------------------------------------------------------- after the grid

@pytest.mark.parametrize("action,touched,now,before,kept,step", [
    (xyz.AFTER_RESTORE, False, "b", "a", True, xyz.STEP_NONE),
    (xyz.AFTER_KEEP, True, "b", "a", True, xyz.STEP_NONE),
    (xyz.AFTER_RESTORE, True, "a", "a", True, xyz.STEP_UNCHANGED),
    (xyz.AFTER_RESTORE, True, None, None, False, xyz.STEP_UNCHANGED),
    (xyz.AFTER_RESTORE, True, "b", None, False, xyz.STEP_RESTORE),
    (xyz.AFTER_RESTORE, True, "b", "a", True, xyz.STEP_RELOAD),
    (xyz.AFTER_RESTORE, True, "b", "a", False, xyz.STEP_CANNOT),
])
def test_after_grid_step(action, touched, now, before, kept, step):
    assert xyz.after_grid_step(action, touched, now, before, kept) == step


def _grid_over(webui, recipes) -> "xyz.GridRun":
    run = xyz.GridRun()
    for recipe in recipes:
        webui.session.merge(recipe, dtype="fp16", device="cpu")
        run.touched = True
    return run


def test_after_grid_loads_the_pre_grid_merge_back_without_merging(webui):
    tab = xyz.section_recipe(xyz.section_values(section_args(enabled=True, base="base", models=["ft1", "ft2"])))
    before = webui.session.merge(tab, dtype="fp16", device="cpu")
    run = _grid_over(webui, [xyz.apply_overrides(tab, {"p": v}) for v in (0.2, 0.3)])
    merges = webui.session.merges_performed
    assert webui.loader.loaded_recipe_hash() != before.recipe_hash
    xyz.after_grid(run)      # outside a WebUI the setting reads as its default: restore
    assert webui.loader.loaded == (before.name, before.recipe_hash)
    assert webui.session.result is before and webui.session.merges_performed == merges
    assert xyz.last_grid()["restored"] == before.name and xyz.last_grid()["merges"] == 2


def test_after_grid_restores_the_original_checkpoint(webui):
    tab = xyz.section_recipe(xyz.section_values(section_args(enabled=True, base="base", models=["ft1"])))
    run = _grid_over(webui, [tab])
    xyz.after_grid(run)
    assert webui.loader.restores == 1 and webui.loader.loaded is None
    assert xyz.last_grid()["restored"] == "original.safetensors"


def test_after_grid_keeps_the_last_merge_when_asked(webui, monkeypatch):
    monkeypatch.setattr(host, "setting", lambda key, default: xyz.AFTER_KEEP if key == xyz.OPT_AFTER_GRID else default)
    tab = xyz.section_recipe(xyz.section_values(section_args(enabled=True, base="base", models=["ft1"])))
    run = _grid_over(webui, [tab])
    last = webui.loader.loaded
    xyz.after_grid(run)
    assert webui.loader.loaded == last and webui.loader.restores == 0
    assert xyz.last_grid()["restored"] is None and xyz.last_grid()["after_grid"] == xyz.AFTER_KEEP


def test_after_grid_reports_a_failed_restore(webui, monkeypatch):
    def broken():
        raise MergeError("the checkpoint that was loaded before the merge is gone")

    tab = xyz.section_recipe(xyz.section_values(section_args(enabled=True, base="base", models=["ft1"])))
    run = _grid_over(webui, [tab])
    monkeypatch.setattr(webui.loader, "restore", broken)
    xyz.after_grid(run)      # never raises into the X/Y/Z script
    assert "is gone" in xyz.last_grid()["error"]


# ----------------------------------------------------------------------------- hot-load rollback

def _modules():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))


def test_write_or_roll_back_puts_the_previous_weights_back(monkeypatch):
    monkeypatch.setenv(hotload_base.TEST_HOOKS_ENV, "1")
    model = _modules()
    previous = {k: v.clone() for k, v in model.state_dict().items()}
    merged = {k: torch.full_like(v, 7.0) for k, v in previous.items()}
    leaves = list(model)
    info = SimpleNamespace(title="prev.safetensors [abc]")
    hotload_base.FAULTS.arm(1)
    with pytest.raises(hotload_base.HotLoadError, match=r"InjectedFault.*\(prev.safetensors \[abc\]\) were put back"):
        hotload_base.CheckpointTracking._write_or_roll_back(
            lambda: model.load_state_dict(merged), leaves, info, lambda: model.load_state_dict(previous))
    assert all(torch.equal(model.state_dict()[k], previous[k]) for k in previous)
    assert not any(m._load_state_dict_pre_hooks for m in leaves)      # the hook is gone again
    # without a fault, the merge is written
    hotload_base.CheckpointTracking._write_or_roll_back(
        lambda: model.load_state_dict(merged), leaves, info, lambda: model.load_state_dict(previous))
    assert all(torch.equal(model.state_dict()[k], merged[k]) for k in merged)


def test_write_or_roll_back_says_when_putting_back_fails_too(monkeypatch):
    monkeypatch.setenv(hotload_base.TEST_HOOKS_ENV, "1")
    model = _modules()
    merged = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}

    def put_back():
        raise OSError("file vanished")

    hotload_base.FAULTS.arm(0)
    with pytest.raises(hotload_base.HotLoadError, match="putting back prev failed too .file vanished.; load a"):
        hotload_base.CheckpointTracking._write_or_roll_back(
            lambda: model.load_state_dict(merged), list(model), SimpleNamespace(title="prev"), put_back)
