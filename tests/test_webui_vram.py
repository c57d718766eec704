"""VRAM belongs to the WebUI (issue 17), as far as a CPU can test it, without a WebUI.

- the X/Y/Z GPU input-cache budget: 0 under lowvram/medvram and on Forge,
  else measured once per grid on the merge device's own index minus a reserve;
  0 outside a grid; the cache dropped and torch's cache emptied on the cache's
  own device after the grid and on an out-of-memory error;
- an out-of-memory merge in the WebUI: VRAM given back, the merge retried on
  the CPU (a real merge of synthetic checkpoints), one clear line otherwise;
- Forge: its memory manager is asked for room before a GPU merge;
- the A1111 swap's move to the WebUI's device never leaves the model split;
- the merge device: the index is kept, a WebUI on mps/xpu merges on the CPU.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import lib_merge.compat as compat
import lib_merge.devices as devices_mod
import lib_merge.webui as dare_merge
from lib_merge.errors import MergeError
from lib_merge.input_cache import MB, InputCache
from lib_merge.recipe import MergeRecipe
from lib_merge.session import MergeSession
from lib_merge.webui import host, xyz_cache
from lib_merge.webui.hotload_a1111 import _to_device

GIB = 1 << 30
OOM = compat.OUT_OF_MEMORY_ERRORS[0]


@pytest.fixture()
def fresh_cache(monkeypatch):
    """xyz_cache's module state as in a new process, on an A1111 host that is not in low-VRAM mode."""
    monkeypatch.setattr(xyz_cache, "_cache", None)
    monkeypatch.setattr(xyz_cache, "_grid_gpu_mb", None)
    monkeypatch.setattr(xyz_cache, "_in_grid", False)
    monkeypatch.setattr(xyz_cache, "_oom_in_grid", False)
    monkeypatch.setattr(host, "detect", lambda: host.A1111)
    monkeypatch.setattr(host, "low_vram_mode", lambda: False)
    monkeypatch.setattr(host, "merge_device", lambda: "cuda:1")
    monkeypatch.setattr(host, "cache_budget_mb", lambda: 512)
    emptied: list[str] = []
    monkeypatch.setattr(compat, "empty_cache", lambda device: emptied.append(str(device)))
    return emptied


def settings(monkeypatch, **values):
    monkeypatch.setattr(host, "setting", lambda key, default: values.get(key, default))


# ----------------------------------------------------------------------------- the budget

def test_auto_budget_leaves_a_reserve_and_nothing_in_low_vram_or_forge():
    assert xyz_cache.auto_budget_mb(10 * GIB, 12 * GIB, False, False) == 10 * 1024 - 3072
    assert xyz_cache.auto_budget_mb(20 * GIB, 24 * GIB, False, False) == 20 * 1024 - 6 * 1024   # 25 % of 24 GiB
    assert xyz_cache.auto_budget_mb(2 * GIB, 8 * GIB, False, False) == 0                       # less than the reserve
    assert xyz_cache.auto_budget_mb(10 * GIB, 12 * GIB, True, False) == 0                      # --lowvram/--medvram
    assert xyz_cache.auto_budget_mb(10 * GIB, 12 * GIB, False, True) == 0                      # Forge
    assert xyz_cache.auto_budget_mb(None, None, False, False) == 0                             # not measurable


def test_budget_is_measured_per_grid_on_the_merge_device(fresh_cache, monkeypatch):
    asked = []
    free = iter([9 * GIB, 5 * GIB])

    def mem_get_info(device):
        asked.append(str(device))
        return next(free), 12 * GIB

    monkeypatch.setattr(compat, "mem_get_info", mem_get_info)
    settings(monkeypatch)
    assert xyz_cache.gpu_budget_mb("cuda:1") == 0            # outside a grid: nothing on the GPU
    xyz_cache.grid_started()
    assert asked == ["cuda:1"]                               # the merge device's own index
    assert xyz_cache.gpu_budget_mb("cuda:1") == 9 * 1024 - 3072
    assert xyz_cache.gpu_budget_mb("cuda:1") == 9 * 1024 - 3072   # once per grid, not per cell
    assert xyz_cache.gpu_budget_mb("cpu") == 0
    xyz_cache.grid_finished()
    assert xyz_cache.gpu_budget_mb("cuda:1") == 0
    xyz_cache.grid_started()                                 # the next grid measures again
    assert xyz_cache.gpu_budget_mb("cuda:1") == 5 * 1024 - 3072
    xyz_cache.grid_finished()


def test_vram_status_says_why(fresh_cache, monkeypatch):
    _cuda_machine(monkeypatch)
    monkeypatch.setattr(host, "merge_device_info", lambda: host.resolve_device("auto", "cuda:1"))
    monkeypatch.setattr(compat, "mem_get_info", lambda device: (9 * GIB, 12 * GIB))
    settings(monkeypatch)
    before = xyz_cache.vram_status()
    assert before == {"merge_device": "cuda:1", "device_note": "", "setting_mb": -1.0, "low_vram": False,
                      "host": "a1111", "in_grid": False, "grid_budget_mb": None}
    xyz_cache.grid_started()
    during = xyz_cache.vram_status()
    assert during["in_grid"] is True and during["grid_budget_mb"] == 9 * 1024 - 3072
    xyz_cache.grid_finished()


@pytest.mark.parametrize("low_vram,kind", [(True, "a1111"), (False, "forge")])
def test_auto_budget_is_zero_with_medvram_and_on_forge(fresh_cache, monkeypatch, low_vram, kind):
    monkeypatch.setattr(compat, "mem_get_info", lambda device: (20 * GIB, 24 * GIB))
    monkeypatch.setattr(host, "low_vram_mode", lambda: low_vram)
    monkeypatch.setattr(host, "detect", lambda: kind)
    settings(monkeypatch)
    xyz_cache.grid_started()
    assert xyz_cache.gpu_budget_mb("cuda:1") == 0
    xyz_cache.grid_finished()


def test_explicit_budget_and_out_of_memory(fresh_cache, monkeypatch):
    monkeypatch.setattr(compat, "mem_get_info", lambda device: pytest.fail("an explicit budget is not measured"))
    settings(monkeypatch, dare_merge_cache_gpu_mb=700)
    xyz_cache.grid_started()
    assert xyz_cache.gpu_budget_mb("cuda:1") == 700
    host.free_vram("cuda:1")                 # an out-of-memory error somewhere in the grid
    assert xyz_cache.gpu_budget_mb("cuda:1") == 0     # RAM only for the rest of this grid
    assert fresh_cache == ["cuda:1"]
    xyz_cache.grid_finished()
    xyz_cache.grid_started()
    assert xyz_cache.gpu_budget_mb("cuda:1") == 700   # a new grid tries the GPU again
    xyz_cache.grid_finished()


# ----------------------------------------------------------------------------- freeing

def _fill(cache: InputCache, sd1_set) -> None:
    recipe = MergeRecipe(method="dare_ties", base=sd1_set["base"], models=sd1_set["models"][:2], p=0.3)
    cache.prepare_recipe(recipe)
    session = MergeSession(sd1_set["dir"], device="cpu", opener=cache.open)
    session.merge(recipe, dtype="fp16", device="cpu", hot_load=False)
    assert cache.stats().files == 3 and cache.stats().ram_bytes > 0


def test_grid_end_drops_a_cache_that_may_hold_vram(fresh_cache, monkeypatch, sd1_set):
    # a CUDA-device cache (on this CPU machine its device tier stays empty and RAM takes the inputs)
    cache = InputCache("cuda:1", device_budget_mb=256, ram_budget_mb=512)
    monkeypatch.setattr(xyz_cache, "_cache", cache)
    settings(monkeypatch, dare_merge_cache_gpu_mb=256)
    xyz_cache.grid_started()
    _fill(cache, sd1_set)
    xyz_cache.grid_finished()
    assert cache.stats().files == 0 and cache.stats().ram_bytes == 0
    assert fresh_cache == ["cuda:1"]          # torch's cache emptied on the cache's own device


def test_grid_end_keeps_a_ram_only_cache(fresh_cache, monkeypatch, sd1_set):
    cache = InputCache("cpu", ram_budget_mb=512)
    monkeypatch.setattr(xyz_cache, "_cache", cache)
    settings(monkeypatch)
    xyz_cache.grid_started()
    _fill(cache, sd1_set)
    xyz_cache.grid_finished()
    assert cache.stats().files == 3 and cache.stats().ram_bytes > 0     # no VRAM involved: kept for the next grid
    assert fresh_cache == []


def test_drop_cache_empties_the_cache_device(fresh_cache, monkeypatch):
    cache = InputCache("cuda:1", device_budget_mb=64, ram_budget_mb=64)
    monkeypatch.setattr(xyz_cache, "_cache", cache)
    assert xyz_cache.drop_cache() == "input cache dropped"
    assert fresh_cache == ["cuda:1"]


# ----------------------------------------------------------------------------- out of memory while merging

class Loader:
    def __init__(self) -> None:
        self.loaded = None

    def load(self, state, name, recipe_hash, recipe) -> None:
        self.loaded = recipe_hash

    def loaded_recipe_hash(self):
        return self.loaded


@pytest.fixture()
def session_on_cuda(sd1_set, monkeypatch):
    """A real session whose merges fail with a CUDA out-of-memory error on any device but the CPU."""
    session = MergeSession(sd1_set["dir"], hot_loader=Loader(), device="cpu")
    real = session.merge
    devices_asked: list[str] = []

    def merge(recipe, dtype="fp16", device=None, **kwargs):
        devices_asked.append(str(device))
        if str(device) != "cpu":
            raise OOM("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 1; 8.00 GiB total capacity)")
        return real(recipe, dtype=dtype, device=device, **kwargs)

    monkeypatch.setattr(session, "merge", merge)
    monkeypatch.setattr(dare_merge, "_session", session)
    monkeypatch.setattr(host, "detect", lambda: host.A1111)
    monkeypatch.setattr(host, "mirror_progress", lambda event, on_interrupt=None: None)
    monkeypatch.setattr(host, "webui_device", lambda: "cuda:1")
    freed: list[str] = []
    monkeypatch.setattr(host, "_vram_holders", [lambda: freed.append("holder")])
    monkeypatch.setattr(compat, "empty_cache", lambda device: freed.append(str(device)))
    return SimpleNamespace(session=session, asked=devices_asked, freed=freed)


def test_out_of_memory_on_the_gpu_merges_on_the_cpu(session_on_cuda, sd1_set):
    recipe = MergeRecipe(method="ties", base=sd1_set["base"], models=sd1_set["models"][:2], k=0.5)
    result, reused = dare_merge.merge_or_reuse(recipe, "fp16", "cuda:1", True)
    assert not reused and session_on_cuda.asked == ["cuda:1", "cpu"]
    assert session_on_cuda.freed == ["holder", "cuda:1"]      # the cache let go, then cuda:1's cached blocks
    assert session_on_cuda.session.hot_loader.loaded == result.recipe_hash
    assert all(t.device.type == "cpu" for t in result.state.values())
    assert "out of memory on cuda:1: merged on the CPU instead" in session_on_cuda.session.last_message


def test_out_of_memory_on_the_cpu_is_one_line(session_on_cuda, sd1_set, monkeypatch):
    def merge(recipe, dtype="fp16", device=None, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(session_on_cuda.session, "merge", merge)
    recipe = MergeRecipe(method="ties", base=sd1_set["base"], models=sd1_set["models"][:2])
    with pytest.raises(MergeError, match=r"^out of memory while merging on cpu \(MemoryError\); .* --medvram$"):
        dare_merge.merge_or_reuse(recipe, "fp16", "cpu", True)


def test_tab_merge_out_of_memory_frees_vram_and_says_so(monkeypatch):
    import contextlib
    freed = []
    monkeypatch.setattr(host, "detect", lambda: host.A1111)
    monkeypatch.setattr(host, "exclusive", lambda task_id=None: contextlib.nullcontext(0.0))
    monkeypatch.setattr(host, "merge_device", lambda: "cuda:1")
    monkeypatch.setattr(host, "free_vram", freed.append)
    tab_host = host.WebUIHost(SimpleNamespace())

    def merge():
        raise OOM("CUDA out of memory. Tried to allocate 1.00 GiB")

    with pytest.raises(MergeError, match="out of memory while merging on cuda:1 .CUDA out of memory. Tried"):
        tab_host.run_exclusive(merge)
    assert freed == ["cuda:1"]
    with pytest.raises(ValueError):                  # anything else passes through untouched
        tab_host.run_exclusive(lambda: (_ for _ in ()).throw(ValueError("bad")))
    assert tab_host.run_exclusive(lambda: 5) == 5


# ----------------------------------------------------------------------------- Forge's memory manager

@pytest.fixture()
def forge_memory(monkeypatch):
    """Records what gpu_room asks Forge for (host._ask_forge_for_room, the one line that calls Forge's
    backend.memory_management.free_memory, is replaced: no Forge module is imitated)."""
    calls = []
    monkeypatch.setattr(host, "_ask_forge_for_room", lambda needed, dev: calls.append((needed, dev)))
    emptied = []
    monkeypatch.setattr(compat, "empty_cache", lambda device: emptied.append(str(device)))
    return SimpleNamespace(calls=calls, emptied=emptied)


def test_forge_room_is_asked_only_for_cuda_merges_on_forge():
    cuda1 = torch.device("cuda", 1)
    assert host.forge_room_bytes(cuda1, 3, host.FORGE) == (1024 + 3 * 384) * MB
    assert host.forge_room_bytes(cuda1, 0, host.FORGE) == (1024 + 384) * MB
    assert host.forge_room_bytes(cuda1, 3, host.A1111) is None
    assert host.forge_room_bytes(torch.device("cpu"), 3, host.FORGE) is None


def test_forge_is_asked_for_room_before_a_gpu_merge(forge_memory, monkeypatch):
    monkeypatch.setattr(host, "detect", lambda: host.FORGE)
    with host.gpu_room("cuda:1", 3):
        assert forge_memory.calls == [((1024 + 3 * 384) * MB, torch.device("cuda", 1))]
        assert forge_memory.emptied == []
    assert forge_memory.emptied == ["cuda:1"]               # given back after the merge
    with pytest.raises(RuntimeError):
        with host.gpu_room("cuda:1", 1):
            raise RuntimeError("merge failed")
    assert forge_memory.emptied == ["cuda:1", "cuda:1"]     # given back on failure too
    with host.gpu_room("cpu", 3):
        pass
    monkeypatch.setattr(host, "detect", lambda: host.A1111)
    with host.gpu_room("cuda:1", 3):
        pass
    assert len(forge_memory.calls) == 2                      # neither a CPU merge nor A1111 asks


def test_every_webui_merge_asks_forge_for_room_first(forge_memory, monkeypatch, sd1_set):
    monkeypatch.setattr(host, "detect", lambda: host.FORGE)
    session = dare_merge.WebUISession(sd1_set["dir"], device="cpu")
    recipe = MergeRecipe(method="ties", base=sd1_set["base"], models=sd1_set["models"][:2])
    result = session.merge(recipe, dtype="fp16", hot_load=False)       # a real CPU merge: Forge is not asked
    assert result.state and forge_memory.calls == []
    seen = []
    monkeypatch.setattr(MergeSession, "merge", lambda self, recipe, dtype="fp16", device=None, **kw:
                        seen.append((device, dtype, kw, len(forge_memory.calls))))
    session.merge(recipe, dtype="bf16", device="cuda:1", hot_load=False)   # the tab's call
    assert seen == [("cuda:1", "bf16", {"hot_load": False}, 1)]          # room asked before the merge ran
    assert forge_memory.calls[0][1] == torch.device("cuda", 1) and forge_memory.emptied == ["cuda:1"]


# ----------------------------------------------------------------------------- the A1111 move to the device

class FailingMove(torch.nn.Module):
    """Raises a CUDA out-of-memory error the first ``times`` it is moved to float64 (standing in for
    a device: the CPU has one device, but a dtype move goes parameter by parameter just the same)."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.times = times

    def _apply(self, fn, *args, **kwargs):
        probe = fn(torch.zeros(1))
        if probe.dtype == torch.float64 and self.times > 0:
            self.times -= 1
            raise OOM("CUDA out of memory. Tried to allocate 20.00 MiB")
        return super()._apply(fn, *args, **kwargs)


def _model(times: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 3), FailingMove(times), torch.nn.Linear(3, 3))


def _dtypes(model) -> set:
    return {p.dtype for p in model.parameters()}


def test_move_to_device_retries_once_after_freeing_vram():
    model, freed = _model(times=1), []
    assert _to_device(model, torch.float64, torch.float32, lambda: freed.append(True)) is None
    assert freed == [True] and _dtypes(model) == {torch.float64}


def test_move_to_device_never_leaves_the_model_split():
    model, freed = _model(times=2), []
    line = _to_device(model, torch.float64, torch.float32, lambda: freed.append(True))
    assert _dtypes(model) == {torch.float32}                 # all of it in one place, not split
    assert freed == [True]
    assert "moving the model to torch.float64 failed (CUDA out of memory. Tried to allocate 20.00 MiB)" in line
    assert "all of it is on torch.float32 now, not split" in line and "\n" not in line


# ----------------------------------------------------------------------------- the merge device

def _cuda_machine(monkeypatch, count: int = 2) -> None:
    monkeypatch.setattr(devices_mod, "cuda_ready", lambda device=None: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_merge_device_keeps_the_cuda_index(monkeypatch):
    _cuda_machine(monkeypatch)
    assert host.resolve_device("auto", "cuda:1").device == "cuda:1"
    assert host.resolve_device("cuda", "cuda:1").device == "cuda:1"   # "cuda" = the WebUI's card
    assert host.resolve_device("cuda", "cpu").device == "cuda"
    assert host.resolve_device("cpu", "cuda:1").device == "cpu"
    assert host.resolve_device("auto", "cuda:1").note == ""
    monkeypatch.setattr(host, "detect", lambda: host.A1111)
    monkeypatch.setattr(host, "setting", lambda key, default: default)
    monkeypatch.setattr(host, "webui_device", lambda: "cuda:1")
    assert host.WebUIHost(SimpleNamespace()).default_device() == "cuda:1"   # the tab's dropdown too


@pytest.mark.parametrize("webui", ["mps", "xpu", "xpu:0"])
def test_webui_on_mps_or_xpu_merges_on_the_cpu_and_says_so(monkeypatch, webui):
    _cuda_machine(monkeypatch, count=0)
    chosen = host.resolve_device("auto", webui)
    assert chosen.device == "cpu"
    assert chosen.note.startswith("merging on the CPU") and webui.split(":")[0] in chosen.note


def test_low_vram_mode_is_assumed_without_a_webui():
    assert host.low_vram_mode() is True      # unknown host: spare no VRAM


def test_http_merge_on_cuda_uses_the_webuis_card(monkeypatch, sd1_set):
    """POST /dare-merge/v1/merge with "device": "cuda" in a WebUI on cuda:1 merges on cuda:1, not cuda:0."""
    import contextlib

    from lib_merge.webui import api
    _cuda_machine(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    session = MergeSession(sd1_set["dir"], hot_loader=Loader(), device="cpu")
    session.hot_loader.loaded_title = lambda: None
    monkeypatch.setattr(dare_merge, "_session", session)
    paths = {"base": sd1_set["base"], "ft1": sd1_set["models"][0]}
    monkeypatch.setattr(host, "find_checkpoint", lambda title: SimpleNamespace(filename=paths[title]))
    monkeypatch.setattr(host, "webui_device", lambda: "cuda:1")
    monkeypatch.setattr(host, "exclusive", lambda job="", task_id=None: contextlib.nullcontext(0.0))
    asked = []

    def merge_or_reuse(recipe, dtype, device, hot_load, progress=None, stats=False):
        asked.append(device)
        return session.merge(recipe, dtype=dtype, device="cpu", hot_load=hot_load, stats=stats), False

    monkeypatch.setattr(dare_merge, "merge_or_reuse", merge_or_reuse)
    answer = api.merge({"base": "base", "models": ["ft1"], "method": "ties", "device": "cuda", "dtype": "fp16"})
    assert asked == ["cuda:1"] and answer["hot_loaded"] is True
