"""The streaming merge: open lazily, walk the keys, merge each in element chunks.

Memory stays O(one tensor) whatever the number of models: each key is
processed in chunks of elements (all N models' slices of a chunk at a time,
read from the files just then, see :class:`RangeSource`; the chunk shrinks as
N grows), and the
only whole-tensor buffers are the output tensor and, for TIES trimming, one
model's delta at a time while its threshold is found.  DARE masks are
regenerated from the hash, never stored.
"""
from __future__ import annotations

import collections
import math
import os
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from . import kernels
from .arch import (ARCH_NAMES, EMA, OTHER, TEXT_ENCODER, UNET, VAE, block_of, component_of,
                   parse_block_values)
from .checkpoint import DTYPE_NAMES, Checkpoint, open_checkpoint
from .lora.fold import linear_in_deltas, lora_sum_of
from .lora.reader import bind_lora, refuse_lora_base
from .errors import ArchitectureError, MergeCancelled, NonFiniteError, ParameterError, ShapeMismatchError
from .masks import MaskHasher, mask_salt
from .select import kth_smallest_pattern
from .recipe import MergeRecipe
from .writer import OUTPUT_TORCH_DTYPES

INPAINT_KEY = "model.diffusion_model.input_blocks.0.0.weight"
# Elements of one chunk summed over all models' rows.  On CPU the block should
# stay in the core's L2 cache through the ~20 ops of a chunk (4 such blocks
# live at once); on CUDA it is sized for kernel launch overhead instead.
CPU_CHUNK_BUDGET = 1 << 17
CUDA_CHUNK_BUDGET = 1 << 23
CPU_MIN_CHUNK = 1 << 12
CPU_MAX_CHUNK = 1 << 16
CUDA_MAX_CHUNK = 1 << 24
# The merge statistics count (kept, elected agreement; and the share of methods without an election) on the
# first and then every STATS_EVERY-th chunk of each key: a fixed sample (every key's first chunk, so all of
# the small keys) that keeps their cost within 10 % of the merge on a CPU.  The share of elected methods is
# summed over every chunk (one cheap sum).  1 = every chunk (exact; the tests compare that with the readable steps).
STATS_EVERY = 4
# Methods without an election pay for their share with a pass over every model's |delta| that the merge
# itself does not make (a weighted sum is only a few copies and a sum): they count one chunk in
# STATS_EVERY * PLAIN_STATS_FACTOR (every key's first chunk still), which keeps them near the same 10 %.
PLAIN_STATS_FACTOR = 4
# LoRAs folded into one input (lora/fold.py) have their shares rebuilt from their factors on the sampled
# chunks, from one row in LORA_STATS_ROW_STRIDE (the same rows for every LoRA): all of them would cost as
# much as the fold saves.
LORA_STATS_ROW_STRIDE = 16


@dataclass
class Progress:
    """What a progress callback receives after each key."""

    keys_done: int
    keys_total: int
    bytes_done: int
    bytes_total: int
    key: str
    seconds: float


class CancelToken:
    """Set from another thread (a Cancel button); the merge stops within one key."""

    def __init__(self) -> None:
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def check(self) -> None:
        if self._cancelled:
            raise MergeCancelled("merge cancelled; nothing was written")


@dataclass
class MergeReport:
    """What happened, for the status line, the log and the CLI."""

    arch: str = ""
    method: str = ""
    device: str = "cpu"
    seconds: float = 0.0
    keys_total: int = 0
    merged: int = 0
    copied: int = 0
    dropped: int = 0
    vae_from_base: int = 0
    other_keys: list[str] = field(default_factory=list)
    missing: dict[str, list[str]] = field(default_factory=dict)     # model file -> keys it lacks
    extra: dict[str, list[str]] = field(default_factory=dict)       # model file -> keys the base lacks
    mismatches: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    output: str | None = None
    output_bytes: int = 0
    # the merge statistics (share, kept, elected_agreement per model and block) as the analysis JSON
    # (lib_merge/analysis/stats.py), when the merge gathered them
    stats: dict | None = None

    def summary(self) -> str:
        lines = [f"{self.method} merge of a {ARCH_NAMES.get(self.arch, self.arch)} model: "
                 f"{self.merged} keys merged, {self.copied} copied from the base"
                 + (f" ({self.vae_from_base} VAE)" if self.vae_from_base else "")
                 + (f", {self.dropped} EMA keys dropped" if self.dropped else "")
                 + f", in {self.seconds:.1f} s on {self.device}"]
        if self.output:
            lines.append(f"wrote {self.output} ({self.output_bytes / 1e9:.2f} GB)")
        for name, keys in self.missing.items():
            lines.append(f"{name} lacks {len(keys)} keys of the base (e.g. {keys[0]}); the base's values "
                         "stand in for it there")
        for name, keys in self.extra.items():
            lines.append(f"{name} has {len(keys)} keys the base lacks (e.g. {keys[0]}); they are ignored")
        lines.extend(self.mismatches)
        if self.other_keys:
            lines.append(f"{len(self.other_keys)} keys outside UNet/text encoder/VAE copied from the base "
                         f"(e.g. {self.other_keys[0]})")
        lines.extend(self.nonfinite)
        lines.extend(self.notes)
        if self.stats:
            from .analysis.stats import summary_line
            lines.append(summary_line(self.stats))
        return "\n".join(lines)


@dataclass
class KeyTask:
    key: str
    action: str                      # "merge" or "copy"
    shape: tuple[int, ...]
    dtype: torch.dtype
    params: kernels.DeltaParams | None = None
    models: list[int] = field(default_factory=list)   # indices into plan.models present at this key
    channel_slice: int | None = None  # inpainting input conv: merge only the first C channels

    @property
    def nbytes(self) -> int:
        """Bytes of this key in the output (progress, work splitting)."""
        return self.dtype.itemsize * numel(self.shape)


class MergePlan:
    """Opened inputs and a per-key decision, made before any heavy work."""

    def __init__(self, recipe: MergeRecipe, out_dtype: str = "fp16",
                 opener: Callable[[str], Checkpoint] = open_checkpoint, stats: bool = False) -> None:
        """``opener`` turns a path into a Checkpoint (the XYZ input cache serves them from memory).

        ``stats``: gather the merge statistics while merging (``report.stats`` at the end); they only
        read the kernels' blocks, so the result is bit-identical either way.
        """
        self.notes = recipe.validate()
        self.recipe = recipe.resolved()
        check_weights_float32(self.recipe)
        if out_dtype not in OUTPUT_TORCH_DTYPES:
            raise ParameterError(f"output dtype must be one of {', '.join(OUTPUT_TORCH_DTYPES)}, got {out_dtype!r}")
        self.out_dtype = OUTPUT_TORCH_DTYPES[out_dtype]
        self.spec = self.recipe.spec
        self.base: Checkpoint = opener(self.recipe.base)
        self.models: list[Checkpoint] = [opener(m) for m in self.recipe.models]
        refuse_lora_base(self.base)   # LoRA files among the models become theta0 + delta readers
        self.models = [bind_lora(m, self.base, self.base.arch) for m in self.models]
        # two or more LoRAs: read as one input where the method only sums task vectors (lora/fold.py)
        self.lora_sum = lora_sum_of(self.models) if self.spec.kind in ("delta", "weighted_sum") else None
        self.arch = self._check_arch()
        self.mask_ids = self._mask_ids()
        self.recipe.block_count_ok(self.arch)
        self.report = MergeReport(arch=self.arch, method=self.spec.name, notes=list(self.notes))
        self._blocks = {name: parse_block_values(text, self.arch, name.replace("_", " "))
                        for name in ("block_alpha", "block_p", "block_k")
                        if (text := getattr(self.recipe, name))}
        self._check_block_ranges()
        self.tasks = self._plan_keys()
        self.stats = self._new_stats() if stats else None
        # counted chunks: 1 in STATS_EVERY for a merge someone waits on; `analyze` counts every chunk (exact)
        self.stats_every = STATS_EVERY

    def _new_stats(self):
        """The statistics' accumulator: whether any key drops or trims (kept is measured), whether signs are elected."""
        from .analysis.stats import MergeStats
        merged = [t.params for t in self.tasks if t.action == "merge" and t.params is not None]
        cuts = self.spec.kind in ("delta", "della") and any(
            p.p > 0 or p.k < 1.0 or p.beta > 0 for p in merged)
        elect = self.spec.kind in ("delta", "della") and self.spec.elect
        return MergeStats(self.arch, len(self.models), counts=cuts, elect=elect)

    def _mask_ids(self) -> list[str] | None:
        """Each model's mask identity (content sha256 + occurrence), when this merge draws DARE masks.

        Hashing a file costs about a second per GB the first time (then the
        hash cache answers), so it is only done when masks are drawn; worker
        processes receive the identities with the recipe.
        """
        r = self.recipe
        if r.mask_ids is not None and r.mask_ids[0] == tuple(r.models):   # computed for these very models
            return list(r.mask_ids[1])
        kind = self.spec.kind
        if not (kind == "della" or (kind == "delta" and "p" in self.spec.uses and (r.p > 0.0 or bool(r.block_p)))):
            return None
        from .errors import CheckpointError
        from .hashing import sha256_file
        from .masks import model_mask_ids
        def digest(path: str) -> str:
            try:
                return sha256_file(path)
            except OSError as exc:
                raise CheckpointError(f"cannot read it to name its DARE masks: {exc.strerror or exc}", path) from None

        unique = list(dict.fromkeys(r.models))
        with ThreadPoolExecutor(max_workers=max(1, min(4, len(unique))), thread_name_prefix="dare-mask-id") as pool:
            found = dict(zip(unique, pool.map(digest, unique)))   # hashlib releases the GIL: files side by side
        ids = model_mask_ids([found[path] for path in r.models])
        r.mask_ids = (tuple(r.models), tuple(ids))
        return ids

    def _check_arch(self) -> str:
        base_arch = self.base.arch
        if base_arch is None:
            raise ArchitectureError("not a Stable Diffusion checkpoint (no SD1/SD2/SDXL UNet or text-encoder "
                                    "keys found)", self.base.path)
        for model in self.models:
            arch = model.arch
            if arch is None:
                raise ArchitectureError("not a Stable Diffusion checkpoint (no SD1/SD2/SDXL UNet or "
                                        "text-encoder keys found)", model.path)
            if arch != base_arch:
                raise ArchitectureError(
                    f"is {ARCH_NAMES[arch]} but the base {self.base.name} is {ARCH_NAMES[base_arch]}; "
                    "models of different architectures cannot be merged", model.path)
        return base_arch

    def _check_block_ranges(self) -> None:
        knob = {"block_alpha": "alpha", "block_p": "p", "block_k": "k"}
        from .della import check_epsilon
        from .recipe import check_range
        for name, values in self._blocks.items():
            for label, value in values.items():
                try:
                    check_range(knob[name], value)
                except ParameterError as exc:
                    raise ParameterError(f"{name.replace('_', ' ')} {label}: {exc}") from None
                why = check_epsilon(value, self.recipe.epsilon or 0.0) \
                    if name == "block_p" and self.spec.kind == "della" else None
                if why:
                    raise ParameterError(f"block p {label}: {why}")

    def _key_params(self, key: str, component: str) -> kernels.DeltaParams:
        r = self.recipe
        alpha = r.alpha
        if component == UNET and r.alpha_unet is not None:
            alpha = r.alpha_unet
        if component == TEXT_ENCODER and r.alpha_te is not None:
            alpha = r.alpha_te
        p, k = r.p, r.k
        block = block_of(key, self.arch)
        if block is not None:
            alpha *= self._blocks.get("block_alpha", {}).get(block, 1.0)
            p = self._blocks.get("block_p", {}).get(block, p)
            k = self._blocks.get("block_k", {}).get(block, k)
        if not self.spec.trim:
            k = 1.0
        if "p" not in self.spec.uses:
            p = 0.0   # Breadcrumbs: no random drop
        return kernels.DeltaParams(p=p, k=k, vote_sgn=r.vote_sgn, lam=r.lam, alpha=alpha,
                                   merge=r.merge, elect=self.spec.elect,
                                   epsilon=float(r.epsilon or 0.0) if "epsilon" in self.spec.uses else 0.0,
                                   beta=float(r.beta or 0.0) if "beta" in self.spec.uses else 0.0,
                                   rescale=r.rescale if "rescale" in self.spec.uses else "uniform")

    def _plan_keys(self) -> list[KeyTask]:
        r, report = self.recipe, None
        report = self.report
        tasks: list[KeyTask] = []
        kinds: dict[Checkpoint, list[tuple[str, torch.dtype, torch.dtype]]] = {}   # int/bool vs float keys
        base_keys = set(self.base.keys())
        for model in self.models:
            extra = [k for k in model.keys() if k not in base_keys and component_of(k) != EMA]
            if extra:
                report.extra[model.name] = extra
        for key in self.base.keys():
            info = self.base.info(key)
            component = component_of(key)
            if component == EMA:
                report.dropped += 1
                continue
            if not info.dtype.is_floating_point:
                for model in self.models:
                    if key in model and model.info(key).dtype.is_floating_point:
                        kinds.setdefault(model, []).append((key, model.info(key).dtype, info.dtype))
                tasks.append(KeyTask(key, "copy", info.shape, info.dtype))
                continue
            out_dtype = self.out_dtype
            if component == OTHER:
                report.other_keys.append(key)
                tasks.append(KeyTask(key, "copy", info.shape, info.dtype))
                continue
            if component == VAE and r.vae == "base":
                report.vae_from_base += 1
                tasks.append(KeyTask(key, "copy", info.shape, out_dtype))
                continue
            present, channel_slice = [], None
            for index, model in enumerate(self.models):
                if key not in model:
                    report.missing.setdefault(model.name, []).append(key)
                    continue
                m_shape = model.info(key).shape
                if not model.info(key).dtype.is_floating_point:
                    # integer/bool values are not weights: merged as float they would come out
                    # scaled by nothing sensible, so the base's values stand in (noted below)
                    kinds.setdefault(model, []).append((key, model.info(key).dtype, info.dtype))
                    continue
                if m_shape == info.shape:
                    present.append(index)
                    continue
                if (key == INPAINT_KEY and len(m_shape) == 4 and len(info.shape) == 4
                        and m_shape[0] == info.shape[0] and m_shape[2:] == info.shape[2:]):
                    shared = min(m_shape[1], info.shape[1])
                    channel_slice = shared if channel_slice is None else min(channel_slice, shared)
                    present.append(index)
                    report.mismatches.append(
                        f"{key}: {model.name} has {m_shape[1]} input channels, the base {info.shape[1]}; "
                        f"the shared {shared} channels are merged, the base's others kept")
                    continue
                message = (f"shape {list(m_shape)} differs from the base's {list(info.shape)} "
                           f"({self.base.name})")
                if r.on_mismatch == "skip":
                    report.mismatches.append(f"{model.path}: key {key}: {message}; skipped for this model")
                    continue
                raise ShapeMismatchError(message + "; choose 'skip mismatched keys' to merge the rest",
                                         model.path, key)
            if not present:
                tasks.append(KeyTask(key, "copy", info.shape, out_dtype))
                continue
            tasks.append(KeyTask(key, "merge", info.shape, out_dtype, self._key_params(key, component),
                                 present, channel_slice))
        for model, keys in kinds.items():
            key, m_dtype, b_dtype = keys[0]
            report.mismatches.append(
                f"{model.path}: {len(keys)} key{'s' if len(keys) > 1 else ''} stored as "
                f"{'integer/bool' if not m_dtype.is_floating_point else 'float'} where the base "
                f"stores {'float' if b_dtype.is_floating_point else 'integer/bool'} (e.g. {key}: "
                f"{DTYPE_NAMES.get(m_dtype, m_dtype)} vs {DTYPE_NAMES.get(b_dtype, b_dtype)}); "
                "not merged from this model: the base's values are kept there")
        report.keys_total = len(tasks)
        return tasks

    def output_entries(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [(t.key, t.shape, t.dtype) for t in self.tasks]

    def close(self) -> None:
        for ckpt in [self.base, *self.models]:
            ckpt.close()


FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_weights_float32(recipe: MergeRecipe) -> None:
    """Refuse model weights that float32, the precision the kernels compute in, cannot hold.

    A weight below the smallest normal float32 becomes 0 there, and a disjoint
    mean that divides by it yields 0/0 = NaN: that is an underflow, and it is
    named as one here rather than surfacing later as a NaN "overflow".
    """
    import math
    for i, w in enumerate(recipe.weights or []):
        name = os.path.basename(recipe.models[i]) if i < len(recipe.models) else f"model {i + 1}"
        if isinstance(w, (int, float)) and 0 < w < FLOAT32_TINY:
            raise ParameterError(f"weight {w:g} of model {i + 1} ({name}) is too small: it underflows to 0 in "
                                 f"float32, the precision the merge computes in (smallest {FLOAT32_TINY:.3g}); "
                                 "only the ratios of the weights matter in a mean, so scale them all up")
        if isinstance(w, (int, float)) and w > FLOAT32_MAX:
            raise ParameterError(f"weight {w:g} of model {i + 1} ({name}) is too large: it overflows float32, "
                                 f"the precision the merge computes in (at most {FLOAT32_MAX:.3g})")
    total = math.fsum(w for w in recipe.weights or [] if isinstance(w, (int, float)))
    if total > FLOAT32_MAX:
        raise ParameterError(f"the weights add up to {total:g}, more than float32 holds ({FLOAT32_MAX:.3g}); "
                             "only their ratios matter in a mean, so scale them down")


class RangeSource:
    """A key's flat elements, read from the file one chunk at a time when sliced.

    The merge walks every key in chunks; reading each input's chunk only when
    it is needed keeps memory at one chunk per model whatever N, as the memory
    maps did, while the reads stay checked (see checkpoint.py: no SIGBUS).
    """

    __slots__ = ("_ckpt", "_key", "_n")

    def __init__(self, ckpt: Checkpoint, key: str) -> None:
        self._ckpt, self._key, self._n = ckpt, key, ckpt.info(key).numel

    def numel(self) -> int:
        return self._n

    def __getitem__(self, span: slice) -> torch.Tensor:
        start, stop, step = span.indices(self._n)
        if step != 1:
            raise ValueError("RangeSource: only contiguous slices")
        return self._ckpt.read_range(self._key, start, stop)


def flat_source(ckpt: Checkpoint, key: str) -> "torch.Tensor | RangeSource":
    """What the merge slices chunk by chunk: ranged reads from a file, or the whole flat tensor once."""
    if getattr(ckpt, "ranged_reads", False):
        return RangeSource(ckpt, key)
    return ckpt.flat(key)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class KeyMerger:
    """Runs the kernels for one key, chunk by chunk, on one device."""

    def __init__(self, plan: MergePlan, device: str, chunk: int | None = None) -> None:
        self.plan = plan
        self.device = torch.device(device)
        n_models = max(1, len(plan.models))
        self._chunk_given = chunk
        self._folded_spaces: dict[int, tuple[int, kernels.Workspace]] = {}   # per row count (see _fold)
        self.chunk = chunk or chunk_size(n_models, self.device)
        self.hasher = MaskHasher(self.device, max_chunk=self.chunk)
        self.workspace = kernels.Workspace(n_models, self.chunk, self.device)
        for model in plan.models:   # LoRA inputs build their deltas on the merge device
            if hasattr(model, "use_device"):
                model.use_device(self.device)
        self._magnitudes = torch.empty(0, dtype=torch.int32, device=self.device)

    def _key_stats(self, chunks: int, rows: int) -> torch.Tensor | None:
        """A zeroed [chunks, STAT_FIELDS, rows] float32 block on the merge device (one slot per chunk), or None.

        Each chunk's kernel writes its own slot (float32 sums of at most 2^24
        elements: counts exact); the key's slots are added in float64 once, at
        its end, with one transfer per key and no sync per chunk.
        """
        if self.plan.stats is None:
            return None
        need = max(chunks, 1) * kernels.STAT_FIELDS * rows
        if getattr(self, "_slots", None) is None or self._slots.numel() < need:   # reused: no allocation per key
            self._slots = torch.empty(max(need, 1024), dtype=torch.float32, device=self.device)
        return self._slots[:need].view(max(chunks, 1), kernels.STAT_FIELDS, rows).zero_()

    def _add_key_stats(self, task: KeyTask, slots: torch.Tensor | None) -> None:
        if slots is None:
            return
        sums = slots[0].tolist() if slots.shape[0] == 1 else slots.sum(0, dtype=torch.float64).tolist()
        if not any(sums[kernels.STAT_NONZERO]):   # no drop/trim at this key: nothing removed, before = after
            sums[kernels.STAT_NONZERO] = list(sums[kernels.STAT_SURVIVED])
        self.plan.stats.add_key(task.key, task.models, sums)

    def merge(self, task: KeyTask, cancel: CancelToken | None) -> torch.Tensor:
        plan = self.plan
        if task.channel_slice is not None:   # the inpainting input conv: small, read whole
            base_full = plan.base.tensor(task.key)
            models_full = [plan.models[i].tensor(task.key) for i in task.models]
            c = task.channel_slice
            base_src = base_full[:, :c].contiguous().reshape(-1)
            model_srcs = [m[:, :c].contiguous().reshape(-1) for m in models_full]
        else:
            base_src = flat_source(plan.base, task.key)
            model_srcs = [flat_source(plan.models[i], task.key) for i in task.models]
        merged = self._merge_flat(task, base_src, model_srcs, cancel)
        if task.channel_slice is None:
            return merged.view(task.shape)
        out = base_full.to(device="cpu", dtype=task.dtype, copy=True)   # on the CPU, wherever the input is
        out[:, :task.channel_slice] = merged.view(out[:, :task.channel_slice].shape)
        return out

    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=False)

    def _merge_flat(self, task: KeyTask, base: torch.Tensor, models: Sequence[torch.Tensor],
                    cancel: CancelToken | None) -> torch.Tensor:
        plan, spec = self.plan, self.plan.spec
        n = base.numel()
        weights = [plan.recipe.weights[i] for i in task.models]
        out = torch.empty(n, dtype=task.dtype)
        if n == 0:
            return out   # an empty tensor merges to an empty tensor (no trim rank, no SLERP angle)
        params = task.params
        masks = thresholds = uppers = None
        coeffs = None
        if spec.kind == "della":
            return self._merge_della(task, base, models, weights, out, cancel)
        if spec.kind == "lincomb":
            from . import lincomb
            g = lincomb.gram(base, models, n)
            coeffs = (lincomb.model_stock_coefficients(g) if spec.name == "model_stock"
                      else lincomb.geometric_median_coefficients(g, weights))
        if spec.kind == "delta":
            if params.p > 0:
                masks = [kernels.DropMask(self.hasher, mask_salt(plan.recipe.seed, task.key, plan.mask_ids[i]))
                         for i in task.models]
            lower_rank, upper_rank = kernels.band_ranks(n, params.k, params.beta) if params.beta > 0 \
                else ((kernels.trim_rank(n, params.k) if params.k < 1.0 else None), None)
            if lower_rank is not None or upper_rank is not None:
                cuts = [self._threshold(base, m, masks[j] if masks else None, params, cancel,
                                        ranks=(lower_rank, upper_rank))
                        for j, m in enumerate(models)]
                thresholds = [c[0] for c in cuts] if lower_rank is not None else None
                uppers = [c[1] for c in cuts] if upper_rank is not None else None
        elif spec.kind == "slerp":
            alpha = params.alpha
            coeffs = kernels.slerp_coefficients(*kernels.slerp_stats(base[0:n], models[0][0:n]), alpha)
        sources, run_weights, folded = models, weights, self._fold(task, models, weights)
        step, ws = self.chunk, self.workspace
        if folded is not None:
            sources, run_weights, folded = folded
            step, ws = self._folded_workspace(len(sources))
        constants = kernels.key_constants(masks, thresholds, run_weights, self.device, uppers)
        chunks = -(-n // step)
        slots = self._key_stats(chunks, len(models))
        chunk_stats = None
        every = plan.stats_every if spec.kind == "delta" or plan.stats_every == 1 \
            else plan.stats_every * PLAIN_STATS_FACTOR
        for start in range(0, n, step):
            if cancel is not None:
                cancel.check()
            stop = min(n, start + step)
            sampled = False
            if slots is not None:
                chunk_stats = slots[start // step]
                sampled = (start // step) % every == 0
            theta0 = self._dev(base[start:stop])
            thetas = [self._dev(m[start:stop]) for m in sources]
            kernel_stats = chunk_stats
            if folded is not None and chunk_stats is not None:
                kernel_stats = self._fold_stats(len(sources))
            if spec.kind == "delta":
                result = kernels.delta_merge_fused(theta0, thetas, run_weights, params, ws, masks,
                                                   thresholds or None, start, constants=constants,
                                                   stats=kernel_stats, stat_counts=sampled)
            elif spec.kind == "weighted_sum":
                result = kernels.weighted_sum_fused(theta0, thetas, run_weights, params.alpha, ws,
                                                    constants, stats=kernel_stats if sampled else None)
            elif spec.kind == "lincomb":
                from .lincomb import lincomb_apply
                result = lincomb_apply(theta0, thetas, coeffs, params.alpha, stats=chunk_stats if sampled else None)
            else:
                result = kernels.slerp_apply(theta0, thetas[0], coeffs)
                if sampled:   # one model: its share is all of the merged delta
                    chunk_stats[kernels.STAT_MASS, 0] = (thetas[0].float() - theta0.float()).abs().sum()
            if kernel_stats is not chunk_stats and sampled:
                self._unfold_stats(task, folded, sources[-1], kernel_stats, chunk_stats, weights, start, stop)
            if not _fits(result, task.dtype):   # NaN/Inf anywhere in the chunk ends up in the result
                self._nonfinite(task, base[start:stop], [m[start:stop] for m in models], result)
            out[start:stop].copy_(result)
        self._add_key_stats(task, slots)
        return out

    def _fold(self, task: KeyTask, models: Sequence, weights: list[float]
              ) -> tuple[list, list[float], list[int]] | None:
        """The key's inputs with its LoRAs folded into one (lora/fold.py), or None where that would change the merge.

        Not folded: a method or key that drops, trims or elects (it needs each delta), weights of the LoRAs
        that add up to 0 (no common weight), the inpainting input conv merged on its shared channels (read
        whole and sliced), and the exact statistics pass of ``analyze`` (it reads every model's share on
        every chunk, so the LoRAs are built one by one there anyway).
        """
        plan, params = self.plan, task.params
        if plan.lora_sum is None or plan.stats_every == 1 or task.channel_slice is not None or not linear_in_deltas(
                plan.spec.kind, plan.spec.elect, params.p, params.k, params.beta):
            return None
        indices, lora_sum = plan.lora_sum
        at = {index: j for j, index in enumerate(task.models)}
        positions = [at[i] for i in indices if i in at]
        total = sum(weights[j] for j in positions)
        if len(positions) != len(indices) or total == 0 or not math.isfinite(total):
            return None
        folded = set(positions)
        keep = [j for j in range(len(models)) if j not in folded]
        source = lora_sum.source(task.key, [weights[j] / total for j in positions], self.device)
        return [models[j] for j in keep] + [source], [weights[j] for j in keep] + [total], positions

    def _folded_workspace(self, rows: int) -> tuple[int, kernels.Workspace]:
        """The chunk and workspace for a key whose LoRAs run folded: fewer rows, so longer chunks in the same
        budget (fewer chunks, fewer passes through the Python loop)."""
        spaces = self._folded_spaces
        if rows not in spaces:
            step = self._chunk_given or chunk_size(rows, self.device)
            spaces[rows] = step, kernels.Workspace(rows, step, self.device)
        return spaces[rows]

    def _fold_stats(self, rows: int) -> torch.Tensor:
        """A zeroed [STAT_FIELDS, rows] block for the kernel when the LoRAs run folded (their rows are rebuilt);
        one per merger, zeroed per chunk rather than allocated."""
        block = getattr(self, "_fold_block", None)
        if block is None or block.shape[1] != rows:
            block = self._fold_block = torch.empty(kernels.STAT_FIELDS, rows, dtype=torch.float32, device=self.device)
        return block.zero_()

    def _unfold_stats(self, task: KeyTask, positions: list[int], source, kernel_stats: torch.Tensor,
                      chunk_stats: torch.Tensor, weights: list[float], start: int, stop: int) -> None:
        """Each model's share of a sampled chunk when its LoRAs ran folded: the others' rows as the kernel
        counted them; each LoRA's |w delta| (all a method linear in the deltas measures per model) estimated
        from every LORA_STATS_ROW_STRIDE-th row of the chunk, built from its factors."""
        folded = set(positions)
        keep = [j for j in range(chunk_stats.shape[1]) if j not in folded]
        if keep:
            chunk_stats[:, keep] = kernel_stats[:, :len(keep)]
        masses = source.sampled_masses(start, stop, LORA_STATS_ROW_STRIDE)
        total = sum(weights[j] for j in positions)   # the folded delta's weight: c_i * total = w_i
        for q, j in enumerate(positions):
            if masses is not None:
                chunk_stats[kernels.STAT_MASS, j] = total * masses[q]
            else:   # a module that does not stack (LoHa, LoKr, DoRA, Tucker): this LoRA's rows, exactly
                lora = self.plan.models[task.models[j]]
                chunk_stats[kernels.STAT_MASS, j] = abs(weights[j]) * lora.delta_abs_sum(task.key, start, stop)

    def _merge_della(self, task: KeyTask, base, models, weights: list[float], out: torch.Tensor,
                     cancel: CancelToken | None) -> torch.Tensor:
        """DELLA on row-aligned blocks (a row's ranks need the whole row); trim thresholds first if k < 1."""
        from . import della
        plan, params = self.plan, task.params
        n = out.numel()
        m = della.row_length(task.shape if task.channel_slice is None
                             else (task.shape[0], n // max(task.shape[0], 1)))
        salts = self.hasher.salts([mask_salt(plan.recipe.seed, task.key, plan.mask_ids[i]) for i in task.models])
        blocks = della.row_blocks(n, m, self.chunk)
        thresholds = None
        if params.k < 1.0:
            thresholds = []
            if self._magnitudes.numel() < n:
                self._magnitudes = torch.empty(n, dtype=torch.int32, device=self.device)
            for j, model in enumerate(models):
                for start, stop in blocks:
                    if cancel is not None:
                        cancel.check()
                    tau = della.della_taus(self._dev(base[start:stop]), [self._dev(model[start:stop])], m,
                                           params.p, params.epsilon, params.lam, self.hasher, salts[j:j + 1],
                                           start)
                    torch.bitwise_and(tau[0].view(torch.int32), self.hasher.const(0x7FFFFFFF),
                                      out=self._magnitudes[start:stop])
                pattern = kth_smallest_pattern(self._magnitudes[:n], kernels.trim_rank(n, params.k))
                thresholds.append(torch.tensor([pattern], dtype=torch.int32).view(torch.float32)[0].to(self.device))
        slots = self._key_stats(len(blocks), len(models))
        for index, (start, stop) in enumerate(blocks):
            if cancel is not None:
                cancel.check()
            theta0 = self._dev(base[start:stop])
            thetas = [self._dev(mdl[start:stop]) for mdl in models]
            taus = della.della_taus(theta0, thetas, m, params.p, params.epsilon, params.lam, self.hasher, salts,
                                    start)
            rows = []
            for t in range(len(models)):
                tau = kernels.trim_(taus[t], thresholds[t] if thresholds else None)
                rows.append(kernels.weigh_(tau, weights[t]))
            gamma = kernels.elect_sign(rows, params.vote_sgn) if params.elect else None
            if slots is not None:
                slots[index].copy_(della.chunk_stats(theta0, thetas, rows, gamma))
            result = kernels.add_back(theta0, kernels.disjoint_merge(rows, weights, gamma, params.merge),
                                      params.alpha)
            if not _fits(result, task.dtype):
                self._nonfinite(task, base[start:stop], [mdl[start:stop] for mdl in models], result)
            out[start:stop].copy_(result)
        self._add_key_stats(task, slots)
        return out

    def _threshold(self, base: torch.Tensor, model: torch.Tensor, mask: kernels.DropMask | None,
                   params: kernels.DeltaParams, cancel: CancelToken | None,
                   ranks: tuple[int | None, int | None] | None = None):
        """Trim threshold of one model's whole (DARE-dropped) delta: one tensor of memory.

        The magnitudes are kept as their int32 bit patterns (|x| is the pattern
        with the sign bit cleared), which is what the radix select counts.
        With ``ranks`` (lower, upper), returns both cuts (None where a rank is None).
        """
        n = base.numel()
        if self._magnitudes.numel() < n:
            self._magnitudes = torch.empty(n, dtype=torch.int32, device=self.device)
        magnitudes = self._magnitudes[:n]
        ws = self.workspace
        salts = self.hasher.salts([mask.salt]) if mask is not None and params.p > 0 else None
        abs_bits = self.hasher.const(0x7FFFFFFF)
        for start in range(0, n, self.chunk):
            if cancel is not None:
                cancel.check()
            stop = min(n, start + self.chunk)
            delta = ws.taus(1, stop - start)
            delta[0].copy_(self._dev(model[start:stop]))
            delta[0].sub_(ws.theta0[:stop - start].copy_(self._dev(base[start:stop])))
            if salts is not None:
                self.hasher.drop_rows_(delta, salts, start, params.p)
            torch.bitwise_and(delta[0].view(torch.int32), abs_bits, out=magnitudes[start:stop])
        if ranks is not None:
            return tuple(None if rank is None else torch.tensor(
                [kth_smallest_pattern(magnitudes, rank)], dtype=torch.int32).view(torch.float32)[0]
                for rank in ranks)
        pattern = kth_smallest_pattern(magnitudes, kernels.trim_rank(n, params.k))
        return torch.tensor([pattern], dtype=torch.int32).view(torch.float32)[0]

    def _nonfinite(self, task: KeyTask, base: torch.Tensor, models: Sequence[torch.Tensor],
                   result: torch.Tensor) -> None:
        plan = self.plan
        culprits = [plan.base.path] if not bool(torch.isfinite(base.float()).all()) else []
        culprits += [plan.models[i].path for i, m in zip(task.models, models)
                     if not bool(torch.isfinite(m.float()).all())]
        if culprits:
            source = f"NaN/Inf in {', '.join(culprits)}"
        elif bool(torch.isnan(result).any()):
            source = ("the merge produced NaN/Inf (NaN: an undefined 0/0 or inf-inf in float32; a weight or "
                      "alpha too small or too large for float32 causes it)")
        else:
            name = next((k for k, v in OUTPUT_TORCH_DTYPES.items() if v == task.dtype), str(task.dtype))
            source = (f"the merge produced NaN/Inf (overflow: values beyond the {name} range "
                      f"±{torch.finfo(task.dtype).max:.6g})")
        message = f"key {task.key}: {source}"
        if plan.recipe.allow_nonfinite:
            if message not in plan.report.nonfinite:
                plan.report.nonfinite.append(message)
            return
        raise NonFiniteError(f"{source}; refusing to produce a result with NaN/Inf "
                             "(allow non-finite values to override)", key=task.key)


def iter_merge(plan: MergePlan, device: str | None = None, progress: Callable[[Progress], None] | None = None,
               cancel: CancelToken | None = None, chunk: int | None = None,
               own_memory: bool = False, workers: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, merged tensor on CPU) in output order; the caller consumes as it goes.

    Keys copied from the base may be views into its storage (a memory map on
    Windows, an input cache's tensor) unless ``own_memory``: fine for writing
    them out, not for keeping them.

    On CPU, keys are merged by ``workers`` threads (default: torch's thread
    count), each running torch single-threaded on its own key.  Chunk-sized ops
    with torch's own thread pool pay a barrier per op; when another process
    takes a core, every barrier waits for a descheduled thread, and a merge
    slowed 30x was measured that way.  Whole keys per thread have no barriers,
    but each op still hands the GIL over, so threads scale poorly; file merges
    on the CPU use worker processes instead (parallel.py).
    """
    device = device or default_device()
    report = plan.report
    report.device = str(device)
    started = time.perf_counter()
    total_bytes = sum(t.nbytes for t in plan.tasks)
    done_bytes = 0
    if workers is None:
        workers = 1 if torch.device(device).type != "cpu" else max(1, min(torch.get_num_threads(), 8))
    results = _merged_in_order(plan, device, chunk, cancel, own_memory, workers)
    try:
        for index, (task, tensor) in enumerate(results):
            if cancel is not None:
                cancel.check()   # keys computed ahead are not handed out after a cancel
            if task.action == "copy":
                report.copied += 1
            else:
                report.merged += 1
            yield task.key, tensor
            done_bytes += task.nbytes
            if progress is not None:
                progress(Progress(index + 1, len(plan.tasks), done_bytes, total_bytes, task.key,
                                  time.perf_counter() - started))
    finally:
        results.close()
    report.seconds = time.perf_counter() - started
    if plan.stats is not None:
        report.stats = plan.stats.to_dict(plan.recipe)


def _merged_in_order(plan: MergePlan, device: str, chunk: int | None, cancel: CancelToken | None,
                     own_memory: bool, workers: int) -> Iterator[tuple[KeyTask, torch.Tensor]]:
    """(task, tensor) in plan order, computed by ``workers`` threads a few keys ahead."""
    mergers: queue.SimpleQueue[KeyMerger] = queue.SimpleQueue()
    for _ in range(workers):
        mergers.put(KeyMerger(plan, device, chunk))

    def produce(index: int) -> torch.Tensor:
        if cancel is not None:
            cancel.check()
        if index + 1 < len(plan.tasks):
            _prefetch(plan, plan.tasks[index + 1])
        if plan.tasks[index].action == "copy":
            return compute_task(plan, None, index, cancel, own_memory)
        merger = mergers.get()
        try:
            return compute_task(plan, merger, index, cancel, own_memory)
        finally:
            mergers.put(merger)

    if workers <= 1:
        for index, task in enumerate(plan.tasks):
            yield task, produce(index)
        return
    stop = CancelToken()
    if cancel is None:
        cancel = stop
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dare-merge")
    try:
        pending: collections.deque = collections.deque()
        next_index = 0
        for index, task in enumerate(plan.tasks):
            while next_index < len(plan.tasks) and next_index <= index + 2 * workers:
                pending.append(pool.submit(produce, next_index))
                next_index += 1
            yield task, pending.popleft().result()
    finally:
        stop.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads_before)


def compute_task(plan: MergePlan, merger: "KeyMerger | None", index: int, cancel: CancelToken | None,
                 own_memory: bool) -> torch.Tensor:
    """The output tensor of task ``index``: merged by ``merger``, or copied (cast) from the base."""
    task = plan.tasks[index]
    if task.action == "copy":
        tensor = plan.base.tensor(task.key)
        if tensor.device.type != "cpu":   # an input cache's device tier: results always come back on the CPU
            return tensor.to(device="cpu", dtype=task.dtype)
        if tensor.dtype != task.dtype:
            return tensor.to(task.dtype)
        return tensor.clone() if own_memory else tensor
    return merger.merge(task, cancel)


def _prefetch(plan: MergePlan, task: KeyTask) -> None:
    """Start reading the next key's inputs while this one is merged."""
    plan.base.prefetch(task.key)
    if task.action == "merge":
        for index in task.models:
            plan.models[index].prefetch(task.key)


def chunk_size(n_models: int, device: torch.device) -> int:
    """Elements per model row of a chunk: a fixed block budget shared by the rows."""
    if device.type == "cuda":
        return max(1 << 16, min(CUDA_MAX_CHUNK, CUDA_CHUNK_BUDGET // n_models))
    return max(CPU_MIN_CHUNK, min(CPU_MAX_CHUNK, CPU_CHUNK_BUDGET // n_models // 1024 * 1024))


def _fits(values: torch.Tensor, dtype: torch.dtype) -> bool:
    """No NaN/Inf now, and none after casting to ``dtype``.

    Fast path: sum of squares (one cheap dot) is finite and at most limit^2,
    so no element can exceed the limit; NaN/Inf make it non-finite.  Only
    when that fails (huge values, or a real problem) the exact min/max pass runs.
    """
    if values.numel() == 0:
        return True
    limit = torch.finfo(dtype).max
    flat = values.reshape(-1)
    squares = float(torch.dot(flat, flat))
    if squares <= min(limit * limit, torch.finfo(torch.float32).max):
        return True
    low, high = torch.aminmax(values)
    return bool((low >= -limit) & (high <= limit))  # False for NaN too


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
