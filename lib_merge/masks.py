"""DARE keep-masks from a counter-based hash.

torch's random generators give different streams on CPU and CUDA and for
different chunkings, so a mask drawn with them could not be reproduced by a
streamed merge, a GPU merge or a later re-run of a stored recipe.  Instead the
keep decision for element ``i`` of model ``t`` at key ``K`` is a pure function
of ``(seed, K, t, i)``:

* a 32-bit salt is derived once per (seed, K, t) with blake2b, so masks of
  different keys and models are unrelated;
* each element's 32 bits are ``h = M2 * xs15(M1 * ((G * i) ^ salt))`` modulo
  2^32, where ``xs15(x) = x ^ (x >>> 15)`` (multiply/xor-shift constants of
  the "lowbias32" family).  The keep test reads the high bits of ``h``, which
  depend on every bit of ``i`` and of the salt.

It is evaluated with in-place int32 tensor ops (which wrap modulo 2^32 on
every torch backend), so masks are bit-identical on CPU and CUDA, under any
chunking and any key order.  :func:`reference_hash` is the same function in
plain Python, the executable definition the tests compare against.
"""
from __future__ import annotations

import hashlib

import torch

GOLDEN = 0x9E3779B1  # odd, so i -> G * i is a bijection modulo 2^32
MIX1 = 0x7FEB352D
MIX2 = 0x846CA68B
_TWO32 = 1 << 32


def _as_int32(value: int) -> int:
    """Two's-complement reading of a 32-bit unsigned value."""
    value &= 0xFFFFFFFF
    return value - _TWO32 if value >= (1 << 31) else value


def mask_salt(seed: int, key: str, model_index: int) -> int:
    """32-bit salt (unsigned) of one (seed, key, model index) triple."""
    digest = hashlib.blake2b(f"{int(seed)}\0{key}\0{int(model_index)}".encode(),
                             digest_size=4, person=b"dare-mask").digest()
    return int.from_bytes(digest, "little")


def reference_hash(salt: int, index: int) -> int:
    """The element hash in plain Python: the definition the tensor code must match."""
    x = ((index * GOLDEN) & 0xFFFFFFFF) ^ (salt & 0xFFFFFFFF)
    x = (x * MIX1) & 0xFFFFFFFF
    x ^= x >> 15
    return (x * MIX2) & 0xFFFFFFFF


def reference_keep(salt: int, index: int, p: float) -> bool:
    """Keep decision in plain Python: the top 31 bits of the hash against p."""
    return (reference_hash(salt, index) >> 1) >= _cut31(p)


def _cut31(p: float) -> int:
    """Keep iff (hash >>> 1) >= this; kept fraction is 1 - p to within 2^-31."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must satisfy 0 <= p < 1, got {p}")
    return int(round(p * (1 << 31)))


class MaskHasher:
    """Evaluates the element hash over index ranges of one device, reusing buffers.

    The per-element work is a handful of in-place int32 ops on a chunk that
    stays in cache; ``G * i`` for i in [0, chunk) is computed once and shifted
    by ``G * start`` for every chunk.
    """

    def __init__(self, device: torch.device | str = "cpu", max_chunk: int = 1 << 18) -> None:
        self.device = torch.device(device)
        self.max_chunk = max_chunk
        self._golden_ramp = torch.arange(max_chunk, dtype=torch.int32, device=self.device)
        self._golden_ramp.mul_(_as_int32(GOLDEN))
        self._x = torch.empty(max_chunk, dtype=torch.int32, device=self.device)
        self._scratch = torch.empty(max_chunk, dtype=torch.int32, device=self.device)

    def hash_into(self, salt: int, start: int, count: int) -> torch.Tensor:
        """int32 hash of elements start..start+count-1 (a view into a reused buffer)."""
        if count > self.max_chunk:
            raise ValueError(f"chunk of {count} exceeds the hasher's {self.max_chunk}")
        if start + count > (1 << 31):
            raise ValueError("tensors above 2^31 elements are not supported by the mask hash")
        x = self._x[:count]
        s = self._scratch[:count]
        torch.add(self._golden_ramp[:count], _as_int32(start * GOLDEN), out=x)
        x.bitwise_xor_(_as_int32(salt))
        x.mul_(_as_int32(MIX1))
        s.copy_(x)
        s.bitwise_right_shift_(15)
        s.bitwise_and_((1 << 17) - 1)
        x.bitwise_xor_(s)
        x.mul_(_as_int32(MIX2))
        return x

    def drop_into(self, values: torch.Tensor, salt: int, start: int, p: float) -> None:
        """Zero, in place, the elements of a float32 chunk that the mask drops.

        Branch-free: d = cut - 1 - (h >>> 1) is negative exactly for kept
        elements, so (d >> 31) is all-ones there and zero elsewhere, and an AND
        on the float's bits keeps or clears it.
        """
        if values.dtype != torch.float32:
            raise TypeError("drop_into works on float32 chunks")
        count = values.numel()
        x = self.hash_into(salt, start, count)
        x.bitwise_right_shift_(1)
        x.bitwise_and_(0x7FFFFFFF)
        x.neg_()
        x.add_(_cut31(p) - 1)
        x.bitwise_right_shift_(31)
        values.view(torch.int32).bitwise_and_(x)

    def keep_mask(self, salt: int, start: int, count: int, p: float) -> torch.Tensor:
        """Boolean keep-mask of a range (for tests and statistics)."""
        out = torch.empty(count, dtype=torch.bool, device=self.device)
        for lo in range(0, count, self.max_chunk):
            n = min(self.max_chunk, count - lo)
            x = self.hash_into(salt, start + lo, n)
            x.bitwise_right_shift_(1)
            x.bitwise_and_(0x7FFFFFFF)
            torch.ge(x, _cut31(p), out=out[lo:lo + n])
        return out


def keep_mask(seed: int, key: str, model_index: int, p: float, numel: int,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Keep-mask (bool, flat) of a whole tensor of one model at one key."""
    hasher = MaskHasher(device, max_chunk=min(max(numel, 1), 1 << 20))
    return hasher.keep_mask(mask_salt(seed, key, model_index), 0, numel, p)
