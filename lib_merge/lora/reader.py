"""A LoRA bound to a base, read like a checkpoint: theta0 + delta on every key.

The engine merges task vectors ``theta_i - theta0``; a LoRA is one, so it
enters the merge as a model whose every key is the base's value plus the
LoRA's delta (zero where it touches nothing).  Every method, block weights,
DARE and TIES then apply to it unchanged, mixed with checkpoints or not, and
in worker processes too (they open the inputs themselves and bind the same
way).  ``--weights`` is the LoRA's strength, as for any model.

Reads are ranged.  A window of rows (at least ``WINDOW`` elements) of
base + delta is built per thread in float32 on the merge device: the base
rows widened into a buffer (read from the file once for every LoRA on that
base, :class:`SharedBase`), then each module's up @ down added onto them by
one addmm.  The engine's chunks are views into that window, so a chunk costs
no read, no add and no allocation; memory is one window per LoRA per thread,
never a whole tensor (except DoRA and LoKr keys, built whole as they must
be).  Keys a LoRA does not touch read as the base itself.
"""
from __future__ import annotations

import collections
import math
import threading
import weakref

import torch

from ..arch import ARCH_NAMES
from ..checkpoint import Checkpoint, TensorInfo
from ..errors import ArchitectureError, CheckpointError, ShapeMismatchError
from .delta import Factors, add_rows_, delta_rows, load_factors, module_shape
from .formats import Module, looks_like_lora, lora_arch_hint, parse_modules
from .keymap import FAMILY_PREFIX, KeyMap, Target, build_keymap

WINDOW = 1 << 20          # elements of delta built at once per key (4 MB float32)
_FACTOR_CACHE = 64        # modules whose factors stay loaded (a few keys ahead of every thread)


def thread_buffer(local: threading.local, n: int, device: torch.device) -> torch.Tensor:
    """This thread's window memory, reused: fresh multi-MB allocations page-fault on every window."""
    buf = getattr(local, "buffer", None)
    if buf is None or buf.numel() < n or buf.device != device:
        buf = torch.empty(max(n, WINDOW), dtype=torch.float32, device=device)
        local.buffer = buf
    return buf[:n]


class SharedBase:
    """What every LoRA bound to one base shares: its key map, and the base chunk this thread read last.

    N LoRAs are N models of the merge, each read as base + delta over the same
    chunk: without sharing, the base chunk was read from the file N times per
    chunk (measured: a third of the time baking 10 SDXL LoRAs) and the key map
    built N times.  One chunk per thread is held; the tensor handed out is
    never written to (the kernels copy their inputs).
    """

    def __init__(self, base: Checkpoint) -> None:
        self._base_ref = weakref.ref(base)   # not the base itself: it is this object's key in _SHARED
        self._local = threading.local()
        self._keymaps: dict[str, KeyMap] = {}
        self._lock = threading.Lock()

    def keymap(self, arch: str) -> KeyMap:
        with self._lock:
            if arch not in self._keymaps:
                self._keymaps[arch] = build_keymap(self._base_ref().shapes(), arch)
            return self._keymaps[arch]

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        last = getattr(self._local, "last", None)
        if last is not None and last[0] == key and last[1] == start and last[2] == stop:
            return last[3]
        base = self._base_ref()
        chunk = base.read_range(key, start, stop) if getattr(base, "ranged_reads", False) \
            else base.flat(key)[start:stop]
        self._local.last = (key, start, stop, chunk)
        return chunk


_SHARED: "weakref.WeakKeyDictionary[Checkpoint, SharedBase]" = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


def shared_base(base: Checkpoint) -> SharedBase:
    """The one :class:`SharedBase` of ``base`` (every LoRA bound to it in this process uses it)."""
    with _SHARED_LOCK:
        shared = _SHARED.get(base)
        if shared is None:
            shared = _SHARED[base] = SharedBase(base)
        return shared


class LoraInput(Checkpoint):
    """``base + delta`` for every key of ``base``; the LoRA's own keys are never shown."""

    def __init__(self, lora: Checkpoint, base: Checkpoint, arch: str, keymap: KeyMap | None = None) -> None:
        super().__init__(lora.path)
        self.metadata = dict(lora.metadata)
        self._lora, self._base, self._arch = lora, base, arch
        self._device: torch.device | None = None
        modules = parse_modules(lora)
        self._shared = shared_base(base)
        keymap = keymap or self._shared.keymap(arch)
        self._check_family(modules, keymap)
        # base key -> [(module, rows slice or None)]
        self._targets: dict[str, list[tuple[Module, tuple[int, int] | None, int, int]]] = {}
        for module in modules:
            targets = keymap.lookup(module.family, module.name)
            first = next(iter(module.parts.values()))
            if not targets:
                raise self._unmatched(module, modules, first)
            rows, cols, text = module_shape(lora, module)
            for target in targets:
                self._check_fit(module, target, rows, cols, text, first)
                self._targets.setdefault(target.key, []).append((module, target.rows, rows, cols))
            if "dora_scale" in module.parts:
                self._check_dora(module, targets, rows, cols)
        for key, info in ((k, base.info(k)) for k in base.keys()):
            self._infos[key] = TensorInfo(info.shape, torch.float32) if key in self._targets else info
        self._cols = {key: max(1, math.prod(self._infos[key].shape[1:])) for key in self._targets}
        self._factors: collections.OrderedDict[str, Factors] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._local = threading.local()

    # -- binding checks
    def _check_family(self, modules: list[Module], keymap: KeyMap) -> None:
        hint = lora_arch_hint(modules, self.metadata)
        if hint is not None and self._arch not in hint.split("/"):
            made = {"sdxl": "SDXL", "sd1": "SD1.x", "sd2": "SD2.x"}.get(hint, "SD1/SD2")
            raise ArchitectureError(f"is a LoRA for {made} but the base {self._base.name} is "
                                    f"{ARCH_NAMES[self._arch]}; a LoRA only applies to the architecture it was "
                                    "trained on", self.path, next(iter(modules[0].parts.values())) if modules else None)

    def _unmatched(self, module: Module, modules: list[Module], key: str) -> Exception:
        return CheckpointError(f"matches no key of the base {self._base.name} ({ARCH_NAMES[self._arch]}): no layer "
                               f"{FAMILY_PREFIX.get(module.family, '')}{module.name} there; nothing was merged",
                               self.path, key)

    def _check_fit(self, module: Module, target: Target, rows: int, cols: int, text: str, key: str) -> None:
        shape = self._base.info(target.key).shape
        want_rows = target.rows[1] - target.rows[0] if target.rows else shape[0]
        want_cols = math.prod(shape[1:])
        if rows != want_rows or cols != want_cols:
            where = f"rows {target.rows[0]}:{target.rows[1]} of " if target.rows else ""
            raise ShapeMismatchError(f"factor shapes do not fit: {text} make a [{rows}, {cols}] delta but "
                                     f"{where}{target.key} in the base {self._base.name} is "
                                     f"[{want_rows}, {want_cols}] (a LoRA for another model?)", self.path, key)

    def _check_dora(self, module: Module, targets: list[Target], rows: int, cols: int) -> None:
        key = module.parts["dora_scale"]
        n = self._lora.info(key).numel
        if any(t.rows for t in targets) or n not in (rows, cols):
            raise CheckpointError(f"dora_scale of {n} values fits neither the {rows} rows nor the {cols} columns "
                                  "of its layer (or the layer is a fused q/k/v slice)", self.path, key)

    # -- Checkpoint interface
    @property
    def arch(self) -> str | None:
        return self._arch

    @property
    def file_size(self) -> int:
        return self._lora.file_size

    @property
    def touched_keys(self) -> list[str]:
        """Base keys this LoRA changes."""
        return list(self._targets)

    ranged_reads = True

    def use_device(self, device: torch.device) -> None:
        """Build deltas on the merge device (the engine says which)."""
        self._device = torch.device(device)

    def flat(self, key: str) -> torch.Tensor:
        if key not in self._cols:
            return self._base.flat(key)
        return self.read_range(key, 0, self._infos[key].numel).clone()   # its own memory, unlike read_range

    def prefetch(self, key: str) -> None:
        self._base.prefetch(key)

    def read_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of base + delta, float32 on the merge device.

        A view into this thread's window of base + delta rows: valid until this thread reads this LoRA
        outside the window (the engine copies each chunk before it reads the next).  A key the LoRA does
        not touch reads as the base: no delta, no zeros.
        """
        cols = self._cols.get(key)
        if cols is None:
            return self._shared.read(key, start, stop)
        start, stop = max(0, start), min(stop, self._infos[key].numel)
        if stop <= start:
            return torch.empty(0, dtype=torch.float32)
        w0, window = self._window(key, start // cols, -(-stop // cols), cols, self._device or torch.device("cpu"))
        return window.view(-1)[start - w0 * cols:stop - w0 * cols]

    # -- base + delta, a window of rows at a time
    def _window(self, key: str, r0: int, r1: int, cols: int, device: torch.device) -> tuple[int, torch.Tensor]:
        cached = getattr(self._local, "window", None)
        if cached is not None and cached[0] == key and cached[1] <= r0 and r1 <= cached[2] \
                and cached[3].device == device:
            return cached[1], cached[3]
        rows_total = self._infos[key].shape[0]
        if self.whole_key(key):
            w0, w1 = 0, rows_total
        else:
            w0, w1 = r0, min(rows_total, max(r1, r0 + max(1, WINDOW // cols)))
        window = self._theta(key, w0, w1, cols, device)
        self._local.window = (key, w0, w1, window)
        return w0, window

    def _theta(self, key: str, r0: int, r1: int, cols: int, device: torch.device) -> torch.Tensor:
        """Rows [r0, r1) of base + this LoRA's delta on ``key``, [rows, columns] float32 (this thread's buffer).

        The base rows are widened into the buffer (read once for all LoRAs on that base, see SharedBase) and
        each module's product is accumulated onto them by one addmm: no delta tensor, no extra pass.
        """
        out = self._buffer((r1 - r0) * cols, device).view(r1 - r0, cols)
        out.view(-1).copy_(self._shared.read(key, r0 * cols, r1 * cols))
        for target in self._targets[key]:
            self.add_target_(out, key, target, r0, r1, device)
        return out

    def add_target_(self, out: torch.Tensor, key: str, target: tuple[Module, tuple[int, int] | None, int, int],
                    r0: int, r1: int, device: torch.device, weight: float = 1.0) -> None:
        """``out`` (rows [r0, r1) of ``key``) += weight * what one of this LoRA's modules adds to those rows."""
        module, rows, m_rows, m_cols = target
        lo, hi = rows if rows else (0, m_rows)
        a, b = max(r0, lo), min(r1, hi)
        if a >= b:
            return
        f = self._factors_of(module, device)
        if f.dora_scale is not None:
            out[a - r0:b - r0].add_(self._dora(key, f, delta_rows(f, a - lo, b - lo, m_rows, m_cols)), alpha=weight)
        else:
            add_rows_(out[a - r0:b - r0], f, a - lo, b - lo, m_rows, m_cols, weight=weight)

    def targets(self, key: str) -> list[tuple[Module, tuple[int, int] | None, int, int]]:
        """This LoRA's modules on ``key``: (module, rows of the key it fills or None, its rows, its columns)."""
        return self._targets.get(key, [])

    def whole_key(self, key: str) -> bool:
        """Whether ``key``'s delta must be built whole (LoKr's Kronecker product, DoRA's norm over the layer)."""
        return any(m.kind == "lokr" or "dora_scale" in m.parts for m, *_ in self._targets.get(key, ()))

    def delta_abs_sum(self, key: str, start: int, stop: int) -> float:
        """sum |delta| over elements [start, stop) of ``key``, built for just those rows (merge statistics)."""
        cols = self._cols.get(key)
        if cols is None or stop <= start:
            return 0.0
        device = self._device or torch.device("cpu")
        if self.whole_key(key):
            theta = self.read_range(key, start, stop)
            return float((theta - self._shared.read(key, start, stop).to(theta.device, torch.float32)).abs().sum())
        r0, r1 = start // cols, -(-stop // cols)
        rows = torch.zeros(r1 - r0, cols, dtype=torch.float32, device=device)
        for target in self._targets[key]:
            self.add_target_(rows, key, target, r0, r1, device)
        return float(rows.view(-1)[start - r0 * cols:stop - r0 * cols].abs().sum())

    @property
    def lora_file(self) -> Checkpoint:
        """The LoRA file itself (its factors)."""
        return self._lora

    def _buffer(self, n: int, device: torch.device) -> torch.Tensor:
        return thread_buffer(self._local, n, device)

    def _dora(self, key: str, f: Factors, d: torch.Tensor) -> torch.Tensor:
        """W' - W with W' = (W + d) * dora_scale / ||W + d|| (whole key; the norm axis from dora_scale's shape).

        A1111 norms each input column (dora_scale (1, in)); Forge uses the output rows when dora_scale
        has one value per row.  The strength then scales W' - W, as Forge does.
        """
        w = self._base.tensor(key).to(device=d.device, dtype=torch.float32).reshape(d.shape)
        merged = w + d
        scale = f.dora_scale.reshape(-1)
        if scale.numel() == d.shape[0] and (scale.numel() != d.shape[1] or f.dora_scale.shape[0] != 1):
            norm = merged.norm(dim=1, keepdim=True)
            return merged * (scale.reshape(-1, 1) / norm) - w
        norm = merged.norm(dim=0, keepdim=True)
        return merged * (scale.reshape(1, -1) / norm) - w

    def _factors_of(self, module: Module, device: torch.device) -> Factors:
        cache_key = f"{module.raw}@{device}"
        with self._lock:
            f = self._factors.get(cache_key)
            if f is not None:
                self._factors.move_to_end(cache_key)
                return f
        f = load_factors(self._lora, module, device)
        with self._lock:
            self._factors[cache_key] = f
            while len(self._factors) > _FACTOR_CACHE:
                self._factors.popitem(last=False)
        return f

    def close(self) -> None:
        self._lora.close()


def bind_lora(model: Checkpoint, base: Checkpoint, arch: str | None) -> Checkpoint:
    """``model`` itself, or, when it is a LoRA file, the LoRA bound to ``base`` (checked against it)."""
    if not looks_like_lora(model):
        return model
    if arch is None:
        raise ArchitectureError("not a Stable Diffusion checkpoint, so a LoRA cannot be applied to it "
                                f"({model.name} is a LoRA)", base.path)
    return LoraInput(model, base, arch)


def refuse_lora_base(base: Checkpoint) -> None:
    """A LoRA holds no full weights: it cannot be the base of a merge."""
    if looks_like_lora(base):
        raise ArchitectureError("is a LoRA, not a full checkpoint; the base must be a checkpoint (give the LoRA "
                                "with the models)", base.path)
