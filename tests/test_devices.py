"""Device resolution (index kept, mps/xpu merge on the CPU with a note) and the GPU out-of-memory fallback.

No GPU is needed: where CUDA must look present, torch.cuda's functions are
replaced by recorders, and a GPU running out of memory is a merge that raises
torch.cuda.OutOfMemoryError, as torch does.
"""
from __future__ import annotations

import pytest
import torch

import lib_merge.session as session_mod
from lib_merge import MergeRecipe, compat
from lib_merge.devices import MergeDevice, resolve_merge_device
from lib_merge.engine import iter_merge as real_iter_merge
from lib_merge.errors import ParameterError
from lib_merge.input_cache import MB, InputCache, default_device_budget_mb, session_reads_from
from lib_merge.session import MergeSession


@pytest.fixture()
def fake_cuda(monkeypatch):
    """torch.cuda as seen on a 2-GPU machine whose current device is 0; records what is called with which device."""
    calls: list[tuple] = []
    state = {"current": 0}

    class _DeviceContext:
        def __init__(self, index):
            self.index = torch.device(index).index if not isinstance(index, int) else index

        def __enter__(self):
            calls.append(("enter", self.index))
            self.prev, state["current"] = state["current"], self.index

        def __exit__(self, *exc):
            state["current"] = self.prev
            calls.append(("exit", self.index))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", _DeviceContext)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty_cache", state["current"])))
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda index=None: calls.append(("mem_get_info", index)) or (8192 << 20, 12288 << 20))
    return calls


def test_cpu_and_auto_without_cuda():
    assert resolve_merge_device("cpu") == MergeDevice("cpu", "cpu")
    if not torch.cuda.is_available():
        auto = resolve_merge_device("auto")
        assert auto.device == "cpu" and auto.note == ""
        asked = resolve_merge_device("cuda:1")
        assert asked.device == "cpu" and "cuda:1" in asked.note and "not available" in asked.note


@pytest.mark.parametrize("name", ["mps", "xpu", "xpu:0", "privateuseone:0"])
def test_untested_accelerators_merge_on_the_cpu_and_say_so(name):
    for chosen in (resolve_merge_device(name), resolve_merge_device("auto", webui_device=name),
                   resolve_merge_device(None, webui_device=name)):
        assert chosen.device == "cpu"
        assert "merging on the CPU" in chosen.note and torch.device(name).type in chosen.note
        assert "hot-load" in chosen.note


def test_nonsense_device_is_one_clear_error():
    with pytest.raises(ParameterError, match="unknown device 'gpu0'"):
        resolve_merge_device("gpu0")


def test_cuda_index_is_kept(fake_cuda):
    assert resolve_merge_device("cuda:1") == MergeDevice("cuda:1", "cuda:1")
    assert resolve_merge_device("cuda").device == "cuda"
    assert resolve_merge_device("auto").device == "cuda"
    assert resolve_merge_device("auto", webui_device="cuda:1").device == "cuda:1"
    beyond = resolve_merge_device("cuda:3")
    assert beyond.device == "cpu" and "2 CUDA devices" in beyond.note
    # the input cache keeps the index too, and makes a bare "cuda" explicit (the current device)
    assert InputCache("cuda:1").device == torch.device("cuda", 1)
    assert InputCache("cuda").device == torch.device("cuda", 0)


def test_rocm_is_the_cuda_path(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.0.32830", raising=False)
    assert resolve_merge_device("cuda").device == "cuda"
    assert "ROCm" in compat.describe_torch()


def test_empty_cache_and_mem_get_info_act_on_the_merge_device(fake_cuda):
    compat.empty_cache("cuda:1")
    assert fake_cuda == [("enter", 1), ("empty_cache", 1), ("exit", 1)]
    fake_cuda.clear()
    InputCache("cuda:1", ram_budget_mb=1).drop()
    assert ("empty_cache", 1) in fake_cuda and ("empty_cache", 0) not in fake_cuda
    fake_cuda.clear()
    assert compat.mem_get_info("cuda:1") == (8192 << 20, 12288 << 20)
    assert fake_cuda == [("mem_get_info", 1)]


def test_default_device_budget(fake_cuda):
    assert default_device_budget_mb("cpu", 1024) == 0
    assert default_device_budget_mb("mps", 1024) == 0
    assert default_device_budget_mb("cuda:1", 1024, lowvram=True) == 0
    assert fake_cuda == []   # lowvram: not even measured
    assert default_device_budget_mb("cuda:1", 2048) == (8192 - 2048) / 2
    assert fake_cuda == [("mem_get_info", 1)]
    assert default_device_budget_mb("cuda:1", 2048, held_mb=1000) == (8192 + 1000 - 2048) / 2
    assert default_device_budget_mb("cuda:1", 10000) == 0


def test_input_cache_keeps_nothing_on_untested_devices():
    for name in ("mps", "xpu:0", "cpu"):
        cache = InputCache(name, device_budget_mb=64, ram_budget_mb=8)
        assert cache.device_budget == 0 and cache.ram_budget == 8 * MB and cache.enabled


def test_default_device_budget_without_cuda():
    if not torch.cuda.is_available():
        assert default_device_budget_mb("cuda", 0) == 0


# ----------------------------------------------------------------------------- the session on other devices

def _recipe(sd1_set):
    return MergeRecipe("dare_ties", sd1_set["base"], sd1_set["models"][:2], p=0.3, k=0.5)


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_session_merges_on_the_cpu_for_mps_and_says_so(sd1_set):
    session = MergeSession(sd1_set["dir"], device="mps")
    result = session.merge(_recipe(sd1_set), hot_load=False, inputs={})
    assert result.report.device == "cpu"
    assert "not tested on mps" in session.last_message
    reference = MergeSession(sd1_set["dir"], device="cpu").merge(_recipe(sd1_set), hot_load=False, inputs={})
    _same(result.state, reference.state)


class _Loader:
    def __init__(self):
        self.loaded = []

    def load(self, state, name, recipe_hash, recipe):
        self.loaded.append(state)

    def restore(self):
        return "original"


def _gpu_that_runs_out(monkeypatch, after_keys: int, error: BaseException):
    """The session believes it merges on cuda:0; that merge raises ``error`` after ``after_keys`` keys."""
    devices_seen = []

    def iter_merge(plan, device=None, *args, **kwargs):
        devices_seen.append(str(device))
        if str(device) == "cpu":
            yield from real_iter_merge(plan, device, *args, **kwargs)
            return
        for index, item in enumerate(real_iter_merge(plan, "cpu", *args, **kwargs)):
            if index == after_keys:
                raise error
            yield item

    monkeypatch.setattr(session_mod, "resolve_merge_device", lambda asked: MergeDevice("cuda:0", str(asked)))
    monkeypatch.setattr(session_mod, "iter_merge", iter_merge)
    emptied = []
    monkeypatch.setattr(session_mod, "empty_cache", lambda device: emptied.append(str(device)))
    return devices_seen, emptied


def test_out_of_memory_on_the_gpu_retries_on_the_cpu(sd1_set, monkeypatch):
    reference = MergeSession(sd1_set["dir"], device="cpu").merge(_recipe(sd1_set), hot_load=False, inputs={})
    devices_seen, emptied = _gpu_that_runs_out(
        monkeypatch, 40, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    loader = _Loader()
    session = MergeSession(sd1_set["dir"], hot_loader=loader, device="cuda")
    cache = InputCache("cpu", ram_budget_mb=64)
    released = []
    monkeypatch.setattr(cache, "out_of_memory", lambda: released.append(True))
    with session_reads_from(session, cache):
        assert session.out_of_memory_hooks == [cache.out_of_memory]
        result = session.merge(_recipe(sd1_set), inputs={})
    assert session.out_of_memory_hooks == []
    assert devices_seen == ["cuda:0", "cpu"] and emptied == ["cuda:0"] and released == [True]
    assert result.report.device == "cpu"
    note = [n for n in result.report.notes if "out of memory" in n]
    assert len(note) == 1 and "cuda:0" in note[0] and "merged on the CPU instead" in note[0]
    assert "\n" not in note[0] and "Tried to allocate 2.00 GiB" in note[0]
    _same(result.state, reference.state)
    assert len(loader.loaded) == 1 and loader.loaded[0] is result.state   # hot-loaded once, after the retry
    assert result.report.merged == reference.report.merged   # the failed attempt's counts are not added


def test_other_gpu_errors_are_not_retried(sd1_set, monkeypatch):
    devices_seen, emptied = _gpu_that_runs_out(monkeypatch, 5, RuntimeError("CUDA error: an illegal memory access"))
    loader = _Loader()
    session = MergeSession(sd1_set["dir"], hot_loader=loader, device="cuda")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        session.merge(_recipe(sd1_set), inputs={})
    assert devices_seen == ["cuda:0"] and emptied == [] and loader.loaded == []
    assert session.result is None


def test_cache_out_of_memory_gives_the_device_tier_back_and_keeps_ram(sd1_set, monkeypatch):
    emptied = []
    monkeypatch.setattr("lib_merge.input_cache.empty_cache", lambda device: emptied.append(str(device)))
    cache = InputCache("cpu", ram_budget_mb=64)
    cache.prepare_recipe(_recipe(sd1_set))
    ckpt = cache.open(sd1_set["base"])
    key = "model.diffusion_model.out.2.weight"
    ckpt.flat(key)
    ram = cache.stats().ram_bytes
    cache.out_of_memory()
    assert cache.stats().ram_bytes == ram and cache.tier_of(sd1_set["base"], key) == "ram"
    assert emptied == ["cpu"]
