"""DARE masks: the tensor hash equals its Python definition; kept fraction and independence."""
from __future__ import annotations

import math

import pytest
import torch

from lib_merge.masks import MaskHasher, keep_mask, mask_salt, reference_hash, reference_keep


def test_tensor_hash_matches_python_reference_across_chunk_boundaries():
    salt = mask_salt(7, "model.diffusion_model.out.2.weight", 3)
    hasher = MaskHasher("cpu", max_chunk=1000)
    for start in (0, 999, 123_456_789, (1 << 31) - 1000):
        got = hasher.hash_into(salt, start, 1000)
        assert [v & 0xFFFFFFFF for v in got.tolist()] == [reference_hash(salt, i) for i in range(start, start + 1000)]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_matches_reference_and_any_chunking(p):
    salt = mask_salt(1, "a.weight", 0)
    whole = keep_mask(1, "a.weight", 0, p, 10_000)
    assert whole.tolist() == [reference_keep(salt, i, p) for i in range(10_000)]
    for chunk in (1, 7, 4096):
        hasher = MaskHasher("cpu", max_chunk=chunk)
        values = torch.ones(10_000)
        for lo in range(0, 10_000, chunk):
            hasher.drop_into(values[lo:lo + chunk], salt, lo, p)
        assert torch.equal(values != 0, whole)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_kept_fraction_is_one_minus_p(p):
    n = 1 << 21
    kept = keep_mask(42, "key", 1, p, n).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) <= 5 * sigma + 1e-9


def test_masks_are_independent_across_keys_models_and_seeds():
    n, p = 1 << 20, 0.5
    ref = keep_mask(0, "k1", 1, p, n).double()
    others = [keep_mask(0, "k1", 2, p, n), keep_mask(0, "k2", 1, p, n), keep_mask(1, "k1", 1, p, n),
              keep_mask(0, "k1.", 1, p, n)]
    for other in others:
        other = other.double()
        both = (ref * other).mean().item()
        assert abs(both - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n)
        corr = torch.corrcoef(torch.stack([ref, other]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n)


def test_neighbouring_elements_are_uncorrelated():
    n = 1 << 20
    mask = keep_mask(3, "k", 0, 0.5, n).double()
    for lag in (1, 2, 64, 4096):
        corr = torch.corrcoef(torch.stack([mask[:-lag], mask[lag:]]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n)


def test_same_inputs_same_mask_and_seed_changes_it():
    a = keep_mask(5, "k", 0, 0.3, 5000)
    assert torch.equal(a, keep_mask(5, "k", 0, 0.3, 5000))
    assert not torch.equal(a, keep_mask(6, "k", 0, 0.3, 5000))


def test_p_out_of_range_is_refused():
    with pytest.raises(ValueError):
        keep_mask(0, "k", 0, 1.0, 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_masks_are_bit_identical_to_cpu():
    salt = mask_salt(9, "k", 2)
    cpu = MaskHasher("cpu", 1 << 16).hash_into(salt, 12345, 1 << 16).clone()
    gpu = MaskHasher("cuda", 1 << 16).hash_into(salt, 12345, 1 << 16).cpu()
    assert torch.equal(cpu, gpu)
