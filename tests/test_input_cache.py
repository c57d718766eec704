"""The X/Y/Z input cache: merges from memory equal merges from disk, tiers obey budgets, entries drop."""
from __future__ import annotations

import os
import time

import pytest
import torch

from lib_merge import MergeRecipe
from lib_merge.api import input_hashes
from lib_merge.checkpoint import open_checkpoint
from lib_merge.engine import MergePlan, iter_merge
from lib_merge.input_cache import DEVICE_TIER, RAM_TIER, MB, CachedCheckpoint, InputCache, device_key, \
    session_reads_from
from lib_merge.session import MergeSession
from lib_merge.synth import synth_entries, _base_value, _finetune_value
from lib_merge.writer import SafetensorsWriter

# A slice of the real SD1 key set: enough for architecture detection and every component.
KEEP = ("model.diffusion_model.input_blocks.1.1.", "model.diffusion_model.out.",
        "cond_stage_model.transformer.text_model.embeddings.", "cond_stage_model.transformer.text_model.final_",
        "first_stage_model.decoder.conv_out.", "first_stage_model.quant_conv.", "model_ema.decay", "alphas_cumprod")
UNET_KEY = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
VAE_KEY = "first_stage_model.decoder.conv_out.weight"
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def _write(path: str, role: str, seed: int, scale: float = 0.01) -> str:
    entries = [e for e in synth_entries("sd1", scale_down=16) if e["key"].startswith(KEEP)]
    dtypes = {"float32": torch.float16, "float16": torch.float16, "int64": torch.int64}
    out = [(e["key"], tuple(e["shape"]), dtypes[e["dtype"]]) for e in entries]
    with SafetensorsWriter(path, out, overwrite=True, metadata_reserve=256) as writer:
        for e, (key, shape, dtype) in zip(entries, out):
            value = _base_value(key, shape, torch.float32 if dtype.is_floating_point else dtype, 0)
            if role == "finetune" and value.is_floating_point():
                value = _finetune_value(key, value.to(dtype), seed, scale, 0.02, 10.0)
            writer.write(key, value.to(dtype))
        writer.commit({"format": "pt", "role": role})
    return path


@pytest.fixture()
def mini(tmp_path):
    base = _write(str(tmp_path / "base.safetensors"), "base", 0)
    models = [_write(str(tmp_path / f"ft{s}.safetensors"), "finetune", s) for s in (1, 2, 3)]
    return {"dir": str(tmp_path), "base": base, "models": models}


def _recipe(mini, **kw):
    kw.setdefault("method", "dare_ties")
    kw.setdefault("p", 0.3)
    kw.setdefault("k", 0.5)
    return MergeRecipe(base=mini["base"], models=mini["models"][:2], **kw)


def _merge(recipe, cache=None):
    """The engine's merge into memory, its inputs opened from disk or through the cache."""
    if cache is not None:
        cache.prepare_recipe(recipe)
    plan = MergePlan(recipe, "fp16", opener=cache.open if cache is not None else open_checkpoint)
    try:
        return dict(iter_merge(plan, "cpu", own_memory=True))
    finally:
        plan.close()


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _total_bytes(paths):
    return sum(os.path.getsize(p) for p in paths)


def test_cached_checkpoint_has_the_checkpoint_interface(mini):
    cache = InputCache("cpu", ram_budget_mb=64)
    cached = cache.open(mini["models"][0])
    disk = open_checkpoint(mini["models"][0])
    assert isinstance(cached, CachedCheckpoint)
    assert (cached.path, cached.name, cached.metadata, cached.arch) == (disk.path, disk.name, disk.metadata, "sd1")
    assert cached.keys() == disk.keys() and cached.shapes() == disk.shapes()
    assert UNET_KEY in cached and "nope" not in cached
    assert cached.info(UNET_KEY) == disk.info(UNET_KEY)
    assert cached.file_size == disk.file_size
    for key in (UNET_KEY, VAE_KEY):
        assert torch.equal(cached.tensor(key), disk.tensor(key))
        assert torch.equal(cached.flat(key), disk.flat(key))  # second read: from memory
    cached.prefetch(UNET_KEY)   # cached: nothing to read ahead; not cached: the file's readahead
    cached.prefetch("alphas_cumprod")
    cached.close()  # a plan closing its inputs must not take them from the next cell
    assert torch.equal(cached.tensor(UNET_KEY), disk.tensor(UNET_KEY))
    assert cache.stats().hits >= 2
    disk.close()


def test_cells_from_the_cache_equal_merges_from_disk(mini):
    cache = InputCache("cpu", ram_budget_mb=256)
    cells = [_recipe(mini, p=p, alpha=a) for p in (0.2, 0.6) for a in (0.5, 1.0)]
    cells.append(_recipe(mini, method="weighted_sum", alpha=0.4))
    cells.append(_recipe(mini, method="ties_soup", k=1.0, p=0.0))
    for i, recipe in enumerate(cells):
        _same(_merge(recipe, cache), _merge(recipe))
        stats = cache.stats()
        if i == 0:
            first_misses = stats.misses
            assert stats.hits == 0 and stats.streamed_bytes == 0
        else:
            assert stats.misses == first_misses, "a later cell read the disk"
    # everything the merges read is in RAM, nothing more than the files hold
    assert 0 < stats.ram_bytes <= _total_bytes([mini["base"], *mini["models"][:2]])
    assert stats.device_bytes == 0 and stats.device_budget == 0  # on CPU, RAM is the device
    # EMA keys are never read, so never cached
    assert cache.tier_of(mini["base"], "model_ema.decay") is None
    assert cache.tier_of(mini["base"], UNET_KEY) == RAM_TIER


def test_cached_inputs_are_not_modified_by_merging(mini):
    cache = InputCache("cpu", ram_budget_mb=256)
    recipe = _recipe(mini, method="add_difference", p=0.5, alpha=2.0)
    for _ in range(2):
        _merge(recipe, cache)
    disk = open_checkpoint(mini["models"][0])
    cached = cache.open(mini["models"][0])
    for key in disk.keys():
        assert torch.equal(cached.tensor(key), disk.tensor(key)), key


def test_ram_budget_is_respected_and_the_rest_streams(mini):
    recipe = _recipe(mini)
    everything = InputCache("cpu", ram_budget_mb=256)
    _merge(recipe, everything)
    needed = everything.stats().ram_bytes
    budget_mb = needed / 3 / MB
    cache = InputCache("cpu", ram_budget_mb=budget_mb)
    reference = _merge(recipe)
    for _ in range(2):
        _same(_merge(recipe, cache), reference)
    stats = cache.stats()
    assert 0 < stats.ram_bytes <= budget_mb * MB
    assert stats.streamed_bytes > 0
    # no budget at all: a pure pass-through that still merges right
    off = InputCache("cpu")
    assert not off.enabled
    _same(_merge(recipe, off), reference)


def test_device_tier(mini):
    """UNet/TE keys go to the device within its budget, the rest to RAM; without CUDA it falls back to RAM."""
    assert device_key(UNET_KEY, merge_vae=False) and not device_key(VAE_KEY, merge_vae=False)
    assert device_key(VAE_KEY, merge_vae=True) and not device_key("alphas_cumprod", merge_vae=True)
    assert not device_key(POSITION_IDS, merge_vae=False, dtype=torch.int64)   # copied, never merged
    assert device_key(POSITION_IDS.replace("position_ids", "token_embedding.weight"), False, torch.float16)
    recipe = _recipe(mini)
    reference = _merge(recipe)
    cache = InputCache("cuda", device_budget_mb=64, ram_budget_mb=64)
    _same(_merge(recipe, cache), reference)
    stats = cache.stats()
    if torch.cuda.is_available():
        assert stats.device_bytes > 0
        assert cache.tier_of(mini["base"], UNET_KEY) == DEVICE_TIER
        assert cache.tier_of(mini["base"], VAE_KEY) == RAM_TIER
        assert cache.tier_of(mini["base"], POSITION_IDS) == RAM_TIER
    else:
        # no CUDA here (a CPU build, or a CUDA build without a driver): RAM from the first failed copy on
        assert stats.device_bytes == 0 and stats.ram_bytes > 0
        assert cache.tier_of(mini["base"], UNET_KEY) == RAM_TIER
        assert stats.notice == ""   # not an out-of-memory event: nothing to tell the user
    second = _merge(recipe, cache)   # served from the cache: merged and copied keys alike come back on the CPU
    _same(second, reference)
    assert {str(t.device) for t in second.values()} == {"cpu"}


class _StandInDevice:
    """The device tier's copy, made on the CPU so the tier logic runs without a GPU; can run out of memory."""

    def __init__(self, fail_after: int | None = None):
        self.copies = 0
        self.fail_after = fail_after

    def __call__(self, source):
        if self.fail_after is not None and self.copies >= self.fail_after:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB (GPU 0; 8 GiB total)")
        self.copies += 1
        return source.clone()


def test_device_tier_holds_only_float_keys_the_kernels_read(mini, monkeypatch):
    cache = InputCache("cuda:0", device_budget_mb=64, ram_budget_mb=64)
    monkeypatch.setattr(cache, "_to_device", _StandInDevice())
    recipe = _recipe(mini)
    reference = _merge(recipe)
    _same(_merge(recipe, cache), reference)
    assert cache.tier_of(mini["base"], UNET_KEY) == DEVICE_TIER
    assert cache.tier_of(mini["base"], POSITION_IDS) == RAM_TIER    # int64: copied to the result, so RAM
    assert cache.tier_of(mini["base"], VAE_KEY) == RAM_TIER         # the base's VAE: copied, not merged
    assert cache.stats().device_bytes > 0 and cache.stats().device_bytes <= 64 * MB


def test_out_of_memory_while_filling_drops_the_device_tier(mini, monkeypatch):
    emptied = []
    monkeypatch.setattr("lib_merge.input_cache.empty_cache", lambda device: emptied.append(str(device)))
    cache = InputCache("cuda:1", device_budget_mb=64, ram_budget_mb=64)
    stand_in = _StandInDevice(fail_after=5)
    monkeypatch.setattr(cache, "_to_device", stand_in)
    recipe = _recipe(mini)
    reference = _merge(recipe)
    _same(_merge(recipe, cache), reference)
    stats = cache.stats()
    assert stand_in.copies == 5                         # the sixth copy ran out of memory; no copy tried after
    assert stats.device_bytes == 0 and cache.tier_of(mini["base"], UNET_KEY) == RAM_TIER
    assert emptied == ["cuda:1"]                        # the cache's own device, its index kept
    assert "out of memory on cuda:1" in stats.notice and "\n" not in stats.notice
    assert "budget" in stats.notice                     # with advice
    assert stats.as_dict()["notice"] == stats.notice
    _same(_merge(recipe, cache), reference)             # and it goes on serving, from RAM
    assert stand_in.copies == 5


def test_out_of_ram_while_filling_streams_the_rest(mini, monkeypatch):
    cache = InputCache("cpu", ram_budget_mb=256)
    real_copy, made = cache._to_ram, []

    def to_ram(source):
        if len(made) >= 3:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:83] DefaultCPUAllocator: can't allocate memory")
        made.append(source.shape)
        return real_copy(source)

    monkeypatch.setattr(cache, "_to_ram", to_ram)
    recipe = _recipe(mini)
    _same(_merge(recipe, cache), _merge(recipe))
    stats = cache.stats()
    assert len(made) == 3 and 0 < stats.ram_bytes and stats.streamed_bytes > 0
    assert "out of RAM" in stats.notice and "\n" not in stats.notice
    _same(_merge(recipe, cache), _merge(recipe))
    assert len(made) == 3   # no copy tried after the failure


def test_other_ram_errors_are_not_swallowed(mini, monkeypatch):
    cache = InputCache("cpu", ram_budget_mb=256)
    monkeypatch.setattr(cache, "_to_ram", lambda source: (_ for _ in ()).throw(RuntimeError("bad dtype")))
    with pytest.raises(RuntimeError, match="bad dtype"):
        _merge(_recipe(mini), cache)


def test_release_gives_everything_back(mini, monkeypatch):
    emptied = []
    monkeypatch.setattr("lib_merge.input_cache.empty_cache", lambda device: emptied.append(str(device)))
    cache = InputCache("cuda:0", device_budget_mb=64, ram_budget_mb=64)
    monkeypatch.setattr(cache, "_to_device", _StandInDevice())
    recipe = _recipe(mini)
    _merge(recipe, cache)
    before = cache.stats()
    assert before.device_bytes > 0 and before.ram_bytes > 0
    freed = cache.release_device_tier()      # the end of a grid: VRAM back, RAM keeps serving
    assert freed == before.device_bytes and emptied == ["cuda:0"]
    assert cache.stats().device_bytes == 0 and cache.stats().ram_bytes == before.ram_bytes
    line = cache.release()
    assert line.startswith("input cache: released") and f"{before.ram_bytes / MB:.0f} MB" in line
    assert cache.cached_files() == [] and cache.stats().ram_bytes == 0 and emptied == ["cuda:0", "cuda:0"]
    assert cache.release() == "input cache: empty"


def test_changing_models_drops_the_others(mini):
    cache = InputCache("cpu", ram_budget_mb=256)
    _merge(_recipe(mini), cache)
    assert sorted(cache.cached_files()) == sorted(os.path.realpath(p) for p in [mini["base"], *mini["models"][:2]])
    before = cache.stats().ram_bytes
    other = MergeRecipe("dare_ties", mini["base"], [mini["models"][2]], p=0.3, k=0.5)
    cache.prepare_recipe(other)
    assert sorted(cache.cached_files()) == [os.path.realpath(mini["base"])]
    assert cache.stats().ram_bytes < before
    _same(_merge(other, cache), _merge(other))
    cache.drop()
    assert cache.cached_files() == [] and cache.stats().ram_bytes == 0


def test_a_file_rewritten_on_disk_is_reread(mini):
    cache = InputCache("cpu", ram_budget_mb=256)
    recipe = _recipe(mini)
    old = _merge(recipe, cache)
    time.sleep(0.01)
    _write(mini["models"][0], "finetune", 99, scale=0.05)   # same name, new content
    new_disk = _merge(recipe)
    assert not torch.equal(new_disk[UNET_KEY], old[UNET_KEY])
    _same(_merge(recipe, cache), new_disk)


def test_budget_change_drops_tensors_but_keeps_serving(mini):
    cache = InputCache("cpu", ram_budget_mb=256)
    recipe = _recipe(mini)
    reference = _merge(recipe, cache)
    cache.configure(ram_budget_mb=128)
    assert cache.stats().ram_bytes == 0
    _same(_merge(recipe, cache), reference)
    assert cache.stats().ram_bytes > 0


def test_input_hashes_are_the_apis_and_follow_the_file(mini):
    cache = InputCache("cpu", ram_budget_mb=64)
    recipe = _recipe(mini)
    cache.prepare_recipe(recipe)
    for path in [recipe.base, *recipe.models]:
        cache.open(path)
    assert cache.input_hashes(recipe.base, recipe.models) == input_hashes(recipe)
    time.sleep(0.01)
    _write(mini["models"][1], "finetune", 42)
    assert cache.input_hashes(recipe.base, recipe.models) == input_hashes(recipe)


def test_session_reads_through_the_cache_only_inside_the_block(mini):
    cache = InputCache("cpu", ram_budget_mb=64)
    session = MergeSession(mini["dir"], device="cpu")
    original = session.opener
    recipe = _recipe(mini)
    cache.prepare_recipe(recipe)
    with session_reads_from(session, cache):
        assert session.opener == cache.open
        first = session.merge(recipe, hot_load=False)
    assert session.opener is original
    assert cache.stats().misses > 0 and cache.stats().ram_bytes > 0
    with pytest.raises(RuntimeError):
        with session_reads_from(session, cache):
            raise RuntimeError("boom")
    assert session.opener is original
    outside = session.merge(recipe, hot_load=False)   # from disk: the cache is not touched
    assert cache.stats().hits == 0
    _same(first.state, outside.state)
    assert first.recipe_hash == outside.recipe_hash
    with session_reads_from(session, InputCache("cpu")):   # a cache with no budget changes nothing
        assert session.opener is original
