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
  the "lowbias32" family).  The keep test reads the high 31 bits of ``h``,
  which depend on every bit of ``i`` and of the salt: with ``r`` those bits
  read as a signed number (``r = int32(h) >> 1``, uniform on [-2^30, 2^30)),
  the element is kept iff ``r < 2^30 - round(p * 2^31)``, so the kept fraction
  is 1 - p to within 2^-31.  Signed on purpose: ``r - limit`` cannot overflow,
  and its sign bit, spread by an arithmetic shift, is the AND-mask that keeps
  or clears the float -- four int32 ops, no boolean tensors (which are several
  times slower on CPU).

It is evaluated with in-place int32 tensor ops (which wrap modulo 2^32 on
every torch backend), so masks are bit-identical on CPU and CUDA, under any
chunking and any key order.  :func:`reference_hash` is the same function in
plain Python, the executable definition the tests compare against.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch

GOLDEN = 0x9E3779B1  # odd, so i -> G * i is a bijection modulo 2^32
MIX1 = 0x7FEB352D
MIX2 = 0x846CA68B
_TWO32 = 1 << 32


def _as_int32(value: int) -> int:
    """Two's-complement reading of a 32-bit unsigned value."""
    value &= 0xFFFFFFFF
    return value - _TWO32 if value >= (1 << 31) else value


# Version of the way a model's masks are named, recorded in each merged file's recipe:
# 1 = by the model's place in the list (before issue 12), 2 = by its content (sha256) and occurrence.
MASK_SCHEME = 2


def mask_salt(seed: int, key: str, model_id: "int | str") -> int:
    """32-bit salt (unsigned) of one (seed, key, model) triple.

    ``model_id`` is what names the model's masks: its :func:`model_mask_ids`
    entry (content hash and occurrence, scheme 2) in a merge; an int (a list
    position, scheme 1) is still accepted for tests and statistics.
    """
    ident = str(int(model_id)) if isinstance(model_id, int) else str(model_id)
    digest = hashlib.blake2b(f"{int(seed)}\0{key}\0{ident}".encode(),
                             digest_size=4, person=b"dare-mask").digest()
    return int.from_bytes(digest, "little")


def model_mask_ids(content_hashes: Sequence[str]) -> list[str]:
    """Mask identities of the listed models: ``sha256#occurrence``.

    A mask that depended on the model's place in the list changed whenever
    the list did (the base listed first, a model added, two swapped).  Named by
    the model's content instead, each model keeps its masks whatever else is
    listed; the occurrence count gives a file listed twice two masks.
    """
    seen: dict[str, int] = {}
    out = []
    for digest in content_hashes:
        count = seen.get(digest, 0)
        seen[digest] = count + 1
        out.append(f"{digest}#{count}")
    return out


def reference_hash(salt: int, index: int) -> int:
    """The element hash in plain Python: the definition the tensor code must match."""
    x = ((index * GOLDEN) & 0xFFFFFFFF) ^ (salt & 0xFFFFFFFF)
    x = (x * MIX1) & 0xFFFFFFFF
    x ^= x >> 15
    return (x * MIX2) & 0xFFFFFFFF


def reference_keep(salt: int, index: int, p: float) -> bool:
    """Keep decision in plain Python: the top 31 bits of the hash, read signed, against p."""
    return (_as_int32(reference_hash(salt, index)) >> 1) < _keep_limit(p)


def _keep_limit(p: float) -> int:
    """Keep iff (int32(hash) >> 1) < this; 2^31 - round(p 2^31) of the 2^31 values of r are kept."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must satisfy 0 <= p < 1, got {p}")
    return (1 << 30) - int(round(p * (1 << 31)))


class MaskHasher:
    """Evaluates the element hash over index ranges of one device, reusing buffers.

    Rows of a [models, chunk] block share the element indices, so ``G * i`` is
    computed once per chunk and each model only differs by its salt; every op
    then runs once over the whole block (one dispatch for all models).
    Integer constants are held as 0-d tensors: a Python int operand costs a
    scalar wrap per op, which on CPU is as much as the op itself on a chunk.
    """

    def __init__(self, device: torch.device | str = "cpu", max_chunk: int = 1 << 18) -> None:
        self.device = torch.device(device)
        self.max_chunk = max_chunk
        self._golden_ramp = torch.arange(max_chunk, dtype=torch.int32, device=self.device)
        self._golden_ramp.mul_(_as_int32(GOLDEN))
        self._x = torch.empty(0, dtype=torch.int32, device=self.device)
        self._scratch = torch.empty(0, dtype=torch.int32, device=self.device)
        self._constants: dict[int, torch.Tensor] = {}

    def const(self, value: int) -> torch.Tensor:
        """A 0-d int32 tensor on the device (cached)."""
        value = _as_int32(value)
        tensor = self._constants.get(value)
        if tensor is None:
            tensor = self._constants[value] = torch.tensor(value, dtype=torch.int32, device=self.device)
        return tensor

    def salts(self, salts: Sequence[int]) -> torch.Tensor:
        """Salts as an int32 column [models, 1], the form :meth:`drop_rows_` takes."""
        return torch.tensor([_as_int32(v) for v in salts], dtype=torch.int32, device=self.device).reshape(-1, 1)

    def _blocks(self, rows: int, count: int, x: torch.Tensor | None = None,
                s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if x is not None and s is not None:
            return x, s
        need = rows * count
        if self._x.numel() < need:
            self._x = torch.empty(need, dtype=torch.int32, device=self.device)
            self._scratch = torch.empty(need, dtype=torch.int32, device=self.device)
        return self._x[:need].view(rows, count), self._scratch[:need].view(rows, count)

    def _hash_rows(self, salts: torch.Tensor, start: int, count: int, x: torch.Tensor | None = None,
                   s: torch.Tensor | None = None) -> torch.Tensor:
        """int32 hashes [models, count] of elements start..start+count-1 (into ``x``, or a reused buffer).

        ``x`` and ``s`` ([models, count] int32) let a caller lend its own
        scratch blocks, so the chunk's working set stays within the cache.
        """
        if count > self.max_chunk:
            raise ValueError(f"chunk of {count} exceeds the hasher's {self.max_chunk}")
        if start + count > (1 << 31):
            raise ValueError("tensors above 2^31 elements are not supported by the mask hash")
        x, s = self._blocks(salts.shape[0], count, x, s)
        golden_i = s[0]   # G * i for this range; s is free again once x holds it
        torch.add(self._golden_ramp[:count], self.const(start * GOLDEN), out=golden_i)
        torch.bitwise_xor(golden_i, salts, out=x)
        x.mul_(self.const(MIX1))
        torch.bitwise_right_shift(x, self.const(15), out=s)
        s.bitwise_and_(self.const((1 << 17) - 1))
        x.bitwise_xor_(s)
        x.mul_(self.const(MIX2))
        return x

    def hash_into(self, salt: int, start: int, count: int) -> torch.Tensor:
        """int32 hash of elements start..start+count-1 of one salt (a view into a reused buffer)."""
        return self._hash_rows(self.salts([salt]), start, count)[0]

    def drop_rows_(self, values: torch.Tensor, salts: torch.Tensor, start: int, p: float,
                   x: torch.Tensor | None = None, s: torch.Tensor | None = None) -> None:
        """Zero, in place, the elements of a float32 block [models, count] that the masks drop.

        Row t uses salt ``salts[t]``; columns are elements start..start+count-1.
        """
        if values.dtype != torch.float32:
            raise TypeError("drop_rows_ works on float32 chunks")
        rows, count = values.shape
        x = self._hash_rows(salts, start, count, x, s)
        x.bitwise_right_shift_(self.const(1))
        x.sub_(self.const(_keep_limit(p)))
        x.bitwise_right_shift_(self.const(31))   # all ones where kept, zero where dropped
        values.view(torch.int32).bitwise_and_(x)

    def drop_into(self, values: torch.Tensor, salt: int, start: int, p: float) -> None:
        """:meth:`drop_rows_` for one flat chunk of one model."""
        self.drop_rows_(values.view(1, -1), self.salts([salt]), start, p)

    def keep_mask(self, salt: int, start: int, count: int, p: float) -> torch.Tensor:
        """Boolean keep-mask of a range (for tests and statistics)."""
        out = torch.empty(count, dtype=torch.bool, device=self.device)
        for lo in range(0, count, self.max_chunk):
            n = min(self.max_chunk, count - lo)
            x = self.hash_into(salt, start + lo, n)
            x.bitwise_right_shift_(1)
            torch.lt(x, _keep_limit(p), out=out[lo:lo + n])
        return out


def keep_mask(seed: int, key: str, model_index: int, p: float, numel: int,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Keep-mask (bool, flat) of a whole tensor of one model at one key."""
    hasher = MaskHasher(device, max_chunk=min(max(numel, 1), 1 << 20))
    return hasher.keep_mask(mask_salt(seed, key, model_index), 0, numel, p)
