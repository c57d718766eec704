"""Any merge written out as a kohya LoRA: the merged delta by truncated SVD.

Each layer's delta ``theta_merged - theta0`` (float32, on the merge device)
is factored as up @ down with up = U * sqrt(S), down = sqrt(S) * Vh, alpha =
rank, so hosts apply it at scale 1.  The square root is split between the
factors so neither holds the singular values whole: an fp16 file then keeps
small deltas from underflowing (sd-scripts #93).  A 3x3 conv is flattened to
[out, in*9] and written as LoCon (down [r, in, 3, 3], up [out, r, 1, 1]).
Names follow kohya: diffusers UNet names for SD1/SD2, LDM names for SDXL,
OpenCLIP q/k/v as three modules plus out_proj, always all four per layer
(A1111 patches a MultiheadAttention only when all four are present).

Each module records the energy it keeps, ||low-rank||^2 / ||delta||^2; the
worst one is in the report and, with all the others, in the metadata.  A rank
at or above min(out, in) is an exact SVD and reproduces the delta to within
the save dtype.  ``torch.svd_lowrank`` (randomized, 4 power iterations,
2r + 10 columns) is tried where the matrix is at least ``LOWRANK_FACTOR``
times the rank on its short side (7-16x faster than LAPACK on SDXL-sized
layers at rank 64) and kept only where it is as good (see truncated_svd).
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..api import build_metadata, input_hashes
from ..arch import OTHER, component_of
from ..engine import CancelToken, MergePlan, MergeReport, Progress, default_device, iter_merge
from ..errors import OutputError, ParameterError
from ..recipe import RECIPE_METADATA_KEY, MergeRecipe
from ..writer import OUTPUT_TORCH_DTYPES, SafetensorsWriter, check_output_target, tensor_bytes
from .keymap import build_keymap

LOWRANK_FACTOR = 6
OVERSAMPLE = 10
LOWRANK_NITER = 4
EIGH_COST = 10   # a symmetric eigensolver's flops per m^3, as measured against a GEMM's on a CPU
_VERSION = {"sd1": ("sd_v1", "False", "stable-diffusion-v1/lora"),
            "sd2": ("sd_v2", "True", "stable-diffusion-v2-512/lora"),
            "sdxl": ("sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora")}


@dataclass
class LoraModuleOut:
    down: torch.Tensor
    up: torch.Tensor
    rank: int
    energy: float
    conv: bool


@dataclass
class LoraExtractReport:
    """What the LoRA holds: modules, ranks, retained energy per module and the worst one."""

    path: str = ""
    rank: int = 0
    conv_rank: int = 0
    modules: int = 0
    energy: dict[str, float] = field(default_factory=dict)
    lowrank_svds: int = 0
    exact_svds: int = 0
    unnamed_keys: int = 0          # changed keys with no LoRA layer (biases, norms, embeddings, VAE)
    unnamed_energy: float = 0.0    # their share of the whole delta's squared norm
    seconds_svd: float = 0.0

    @property
    def worst(self) -> tuple[str, float]:
        if not self.energy:
            return "", 1.0
        name = min(self.energy, key=self.energy.get)
        return name, self.energy[name]

    def lines(self) -> list[str]:
        name, value = self.worst
        mean = sum(self.energy.values()) / max(1, len(self.energy))
        out = [f"wrote LoRA {self.path}: {self.modules} modules, rank {self.rank} (convs {self.conv_rank}); "
               f"retained energy mean {mean:.4f}, worst {value:.4f} ({name})"]
        if self.unnamed_keys:
            out.append(f"{self.unnamed_keys} changed keys have no LoRA layer (biases, norms, embeddings, VAE) and "
                       f"are not in the LoRA: {self.unnamed_energy:.2%} of the delta's squared norm")
        return out


def truncated_svd(mat: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """U [m, r], S [r], Vh [r, n] of the best rank-``rank`` approximation; and whether it was randomized.

    Exact: the eigenvectors of the short side's Gram matrix (:func:`gram_svd`).
    ``torch.svd_lowrank`` is used where its cost model says it is cheaper
    (large, nearly square layers: the eigensolver's m^3 dominates there) and
    kept only where it is as good as the exact one: when the spectrum has
    dropped to half by the last singular value it computed (its error then
    shrinks like 0.5^(2 niter + 1)), or when it already holds 99.9 % of the
    energy.  A flat spectrum (a DARE-dropped delta is close to noise) is
    refactored exactly: measured on a 1280 x 1280 noise matrix at rank 64,
    randomized kept 0.152 of the energy, exact 0.172.
    """
    short, long = min(mat.shape), max(mat.shape)
    r = min(rank, short)
    q = min(short, 2 * r + OVERSAMPLE)
    lowrank_cost = (2 * LOWRANK_NITER + 2) * 2 * q * short * long
    gram_cost = 2 * short * short * long + EIGH_COST * short ** 3
    if short >= LOWRANK_FACTOR * (r + OVERSAMPLE) and lowrank_cost < gram_cost:
        u, s, v = torch.svd_lowrank(mat, q=q, niter=LOWRANK_NITER)
        total = float(torch.linalg.vector_norm(mat, dtype=torch.float64)) ** 2
        kept = float(s[:r].double().pow(2).sum())
        if float(s[q - 1]) <= 0.5 * float(s[r - 1]) or total == 0 or kept >= 0.999 * total:
            return u[:, :r], s[:r], v[:, :r].T, True
    u, s, vh = gram_svd(mat, r)
    return u, s, vh, False


def gram_svd(mat: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact truncated SVD from the eigenvectors of the Gram matrix of the short side.

    With A the matrix laid short side first, A A^T = U S^2 U^T: its top
    ``rank`` eigenvectors are A's left singular vectors, and U^T A = S V^T
    gives the right ones with the singular values as their norms.  One GEMM
    and a small symmetric eigensolver: 2-8x faster than LAPACK's SVD on the
    layers of a scaled-down SDXL on a CPU, same energy to 7 digits (benchmarks
    in RESULTS.md).  U U^T A is A projected on U, so at full rank the product
    gives A back to float32 rounding whatever the conditioning; below it, an
    eigenvector mixed with a neighbour of nearly the same singular value loses
    no energy to speak of.  Squaring the matrix in float32 costs a singular
    value s a relative error of about eps * (s_1 / s)^2: 1e-3 at s = s_1 / 100,
    and the values far below that come out blurred; the energy kept stays that
    of the exact SVD to 1e-6 (tests), finer than an fp16 file stores.
    """
    wide = mat.shape[0] <= mat.shape[1]
    a = mat if wide else mat.T
    r = min(rank, a.shape[0])
    try:
        _, vectors = torch.linalg.eigh(a @ a.T)
    except RuntimeError:   # the eigensolver did not converge (NaN/Inf are refused earlier): LAPACK's SVD
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    u = vectors[:, -r:].flip(1)            # eigh sorts ascending
    right = u.T @ a                         # S V^T
    s = torch.linalg.vector_norm(right, dim=1)
    vh = right / torch.where(s > 0, s, torch.ones_like(s))[:, None]
    order = torch.argsort(s, descending=True)
    u, s, vh = u[:, order], s[order], vh[order]
    return (u, s, vh) if wide else (vh.T, s, u.T)


def factor(delta: torch.Tensor, rank: int, dtype: torch.dtype, total: float | None = None
           ) -> tuple[LoraModuleOut, bool]:
    """One module's factors from a delta shaped like its layer (2-D Linear, 4-D conv); ``total``: its ||delta||^2."""
    out_dim = delta.shape[0]
    mat = delta.reshape(out_dim, -1).float()
    if total is None:
        total = float(torch.linalg.vector_norm(mat, dtype=torch.float64)) ** 2
    u, s, vh, randomized = truncated_svd(mat, rank)
    r = s.numel()
    kept = float(s.double().pow(2).sum())
    energy = 1.0 if total == 0 else min(1.0, kept / total)
    root = s.clamp_min(0).sqrt()
    up, down = u * root, root[:, None] * vh
    conv = delta.dim() == 4
    if conv:
        up = up.reshape(out_dim, r, 1, 1)
        down = down.reshape(r, *delta.shape[1:])
    for name, t in (("up", up), ("down", down)):
        if not bool(torch.isfinite(t).all()):
            raise ParameterError(f"the SVD of a layer's delta gave non-finite {name} factors")
    if dtype != torch.float32:
        limit = torch.finfo(dtype).max
        if float(up.abs().max()) > limit or float(down.abs().max()) > limit:
            raise OutputError(f"a LoRA factor exceeds the {dtype} range; save the LoRA as fp32")
    return LoraModuleOut(down.to("cpu", dtype), up.to("cpu", dtype), r, energy, conv), randomized


def _zero_module(shape: tuple[int, ...], dtype: torch.dtype) -> LoraModuleOut:
    """A rank-1 module of zeros: completes an OpenCLIP layer whose other parts changed."""
    conv = len(shape) == 4
    shape_up = (shape[0], 1, 1, 1) if conv else (shape[0], 1)
    shape_down = (1, *shape[1:]) if conv else (1, shape[1])
    return LoraModuleOut(torch.zeros(shape_down, dtype=dtype), torch.zeros(shape_up, dtype=dtype), 1, 1.0, conv)


def file_entries(plan: MergePlan, out_dtype: str) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The checkpoint file's entries when ``plan`` merges in float32 but the file is ``out_dtype``.

    The engine gives floats of every component but OTHER the output dtype and
    keeps the base's dtype elsewhere; this mirrors that (checked by a test
    against a plain merge's file).
    """
    dtype = OUTPUT_TORCH_DTYPES[out_dtype]
    return [(t.key, t.shape, dtype if t.dtype.is_floating_point and component_of(t.key) != OTHER else t.dtype)
            for t in plan.tasks]


def merge_to_lora(recipe: MergeRecipe, lora_path: str, rank: int = 32, conv_rank: int | None = None,
                  out_path: str | None = None, out_dtype: str = "fp16", lora_dtype: str | None = None,
                  overwrite: bool = False, device: str | None = None,
                  progress: Callable[[Progress], None] | None = None, cancel: CancelToken | None = None,
                  chunk: int | None = None, workers: int | None = None,
                  protected_paths: Sequence[str] = ()) -> tuple[MergeReport, LoraExtractReport]:
    """Merge, and write the merged delta as a LoRA (and the checkpoint too when ``out_path`` is given).

    The merge runs in float32 so the delta is not rounded to fp16 before it
    is factored; the checkpoint (if any) is cast to ``out_dtype`` as usual.
    """
    for name, value in (("LoRA rank", rank), ("LoRA conv rank", conv_rank)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ParameterError(f"{name} must be a whole number of at least 1, got {value!r}")
    conv_rank = conv_rank or rank
    lora_dtype = lora_dtype or out_dtype
    if lora_dtype not in OUTPUT_TORCH_DTYPES:
        raise ParameterError(f"LoRA dtype must be one of {', '.join(OUTPUT_TORCH_DTYPES)}, got {lora_dtype!r}")
    save = OUTPUT_TORCH_DTYPES[lora_dtype]
    inputs = [recipe.base, *recipe.models] if isinstance(recipe.models, (list, tuple)) else [recipe.base]
    lora_abs = os.path.abspath(lora_path)
    check_output_target(lora_abs, inputs, "an input of this merge")
    check_output_target(lora_abs, protected_paths, "which is protected (the checkpoint loaded now)")
    if os.path.lexists(lora_abs) and not overwrite:
        raise OutputError("exists already; choose another name or allow overwriting", lora_abs)
    if not os.path.isdir(os.path.dirname(lora_abs)):
        raise OutputError("the output folder does not exist", os.path.dirname(lora_abs))
    if out_path is not None and os.path.abspath(out_path) == lora_abs:
        raise OutputError("the LoRA and the checkpoint cannot be the same file", lora_abs)
    plan = MergePlan(recipe, "fp32")
    extract = LoraExtractReport(path=lora_abs, rank=rank, conv_rank=conv_rank)
    writer = None
    try:
        device = device or default_device()
        names = build_keymap(plan.base.shapes(), plan.arch).names
        actions = {t.key: t.action for t in plan.tasks}
        entries = file_entries(plan, out_dtype)
        if out_path is not None:
            writer = SafetensorsWriter(out_path, entries, overwrite=overwrite,
                                       protected_paths=[plan.recipe.base, *plan.recipe.models, *protected_paths])
        modules: dict[str, LoraModuleOut] = {}
        like: dict[str, tuple[int, ...]] = {}
        totals = {"all": 0.0, "unnamed": 0.0}

        def collect(job: "Future[_KeyFactors]") -> None:
            done = job.result()
            totals["all"] += done.energy
            if done.unnamed:
                extract.unnamed_keys += 1
                totals["unnamed"] += done.energy
            like.update(done.like)
            for name, (module, randomized) in done.modules.items():
                modules[name] = module
                extract.lowrank_svds += randomized
                extract.exact_svds += not randomized
            extract.seconds_svd += done.seconds

        threads = svd_threads(device)
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dare-merge-svd")
        pending: collections.deque = collections.deque()
        try:
            merged_keys = iter_merge(plan, device, progress, cancel, chunk, workers=workers)
            for (key, merged), (_, _, file_dtype) in zip(_closing(merged_keys), entries):
                if writer is not None:
                    writer.write(key, merged.to(file_dtype))
                if actions.get(key) != "merge":
                    continue
                base = plan.base.tensor(key)
                delta = merged.to(device=device, dtype=torch.float32) - base.to(device=device, dtype=torch.float32)
                pending.append(pool.submit(_factor_key, delta, names.get(key), rank, conv_rank, save))
                while len(pending) > 2 * threads:   # a few keys' deltas in memory, not the whole merge's
                    collect(pending.popleft())
            while pending:
                collect(pending.popleft())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        total_energy, unnamed_energy = totals["all"], totals["unnamed"]
        _complete_openclip_layers(modules, like, save, "lora_te2_" if plan.arch == "sdxl" else
                                  "lora_te_" if plan.arch == "sd2" else None)
        extract.unnamed_energy = unnamed_energy / total_energy if total_energy else 0.0
        extract.energy = {n: m.energy for n, m in sorted(modules.items())}
        extract.modules = len(modules)
        if cancel is not None:
            cancel.check()
        hashes = input_hashes(plan.recipe)
        merge_meta = build_metadata(plan.recipe, hashes, out_dtype)
        _write_lora(lora_abs, modules, extract, plan, merge_meta, overwrite)
        if writer is not None:
            plan.report.output = writer.commit(merge_meta)
            plan.report.output_bytes = os.path.getsize(plan.report.output)
            writer = None
        plan.report.notes.extend(extract.lines())
        return plan.report, extract
    finally:
        if writer is not None:
            writer.abort()
        plan.close()


@dataclass
class _KeyFactors:
    """One merged key's share of the LoRA: its modules, their shapes, its delta's squared norm."""

    energy: float
    unnamed: bool
    like: dict[str, tuple[int, ...]]
    modules: dict[str, tuple[LoraModuleOut, bool]]
    seconds: float


def svd_threads(device: str) -> int:
    """Threads that factor keys beside the merge: the CPU's cores (LAPACK runs one per thread while the merge
    holds torch at one), one on a GPU (it runs the products itself)."""
    if torch.device(device).type != "cpu":
        return 1
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 8))
    except (AttributeError, OSError):
        return max(1, min(os.cpu_count() or 1, 8))


def _factor_key(delta: torch.Tensor, layers: list[tuple[str, tuple[int, int] | None]] | None, rank: int,
                conv_rank: int, save: torch.dtype) -> _KeyFactors:
    """Factor each LoRA layer of one key's delta (a pool thread's job)."""
    started = time.perf_counter()
    energy = float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
    if layers is None:   # biases, norms, embeddings, VAE: no LoRA layer
        return _KeyFactors(energy, energy > 0, {}, {}, 0.0)
    like, modules = {}, {}
    for name, rows in layers:
        part = delta[rows[0]:rows[1]] if rows else delta
        like[name] = tuple(part.shape)
        part_energy = energy if not rows else float(torch.linalg.vector_norm(part, dtype=torch.float64)) ** 2
        if part_energy == 0:
            continue
        conv3 = part.dim() == 4 and tuple(part.shape[2:]) != (1, 1)
        modules[name] = factor(part, conv_rank if conv3 else rank, save, part_energy)
    return _KeyFactors(energy, False, like, modules, time.perf_counter() - started)


def _closing(gen):
    """Yield from ``gen`` and close it however the loop ends (the merge's threads stop with it)."""
    try:
        yield from gen
    finally:
        gen.close()


def _complete_openclip_layers(modules: dict[str, LoraModuleOut], like: dict[str, tuple[int, ...]],
                              dtype: torch.dtype, prefix: str | None) -> None:
    """Per OpenCLIP layer (SD2's te, SDXL's te2) q, k, v and out_proj all present, zero where unchanged."""
    if prefix is None:
        return
    layers: dict[str, list[str]] = {}
    for name in like:
        if name.startswith(prefix) and name.endswith(("_self_attn_q_proj", "_self_attn_k_proj",
                                                      "_self_attn_v_proj", "_self_attn_out_proj")):
            layers.setdefault(name.rsplit("_self_attn_", 1)[0], []).append(name)
    for members in layers.values():
        if any(m in modules for m in members):
            for m in members:
                if m not in modules:
                    modules[m] = _zero_module(like[m], dtype)


def _write_lora(path: str, modules: dict[str, LoraModuleOut], extract: LoraExtractReport, plan: MergePlan,
                merge_meta: dict[str, str], overwrite: bool) -> None:
    entries, tensors = [], []
    for name in sorted(modules):
        m = modules[name]
        for suffix, t in ((".alpha", torch.tensor(float(m.rank), dtype=m.up.dtype)),
                          (".lora_down.weight", m.down), (".lora_up.weight", m.up)):
            entries.append((name + suffix, tuple(t.shape), t.dtype))
            tensors.append(t.contiguous())
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(tensor_bytes(t))
    version, v2, spec = _VERSION[plan.arch]
    has_conv = any(m.conv and m.down.dim() == 4 and tuple(m.down.shape[2:]) != (1, 1) for m in modules.values())
    worst_name, worst = extract.worst
    info = {"rank": extract.rank, "conv_rank": extract.conv_rank, "modules": extract.modules,
            "worst": {"module": worst_name, "energy": round(worst, 6)},
            "mean_energy": round(sum(extract.energy.values()) / max(1, len(extract.energy)), 6),
            "svd": {"exact": extract.exact_svds, "randomized": extract.lowrank_svds},
            "not_in_lora": {"keys": extract.unnamed_keys, "energy_share": round(extract.unnamed_energy, 6)},
            "energy": {n: round(e, 6) for n, e in extract.energy.items()}}
    metadata = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(extract.rank),
        "ss_network_alpha": str(extract.rank), "ss_base_model_version": version, "ss_v2": v2,
        "modelspec.architecture": spec, "modelspec.sai_model_spec": "1.0.0",
        "ss_output_name": os.path.splitext(os.path.basename(path))[0],
        "sshs_model_hash": digest.hexdigest(),
        "dare_merge_lora": json.dumps(info, sort_keys=True),
        RECIPE_METADATA_KEY: merge_meta[RECIPE_METADATA_KEY],
        "format": "pt",
    }
    if has_conv:
        metadata["ss_network_args"] = json.dumps({"conv_dim": str(extract.conv_rank),
                                                  "conv_alpha": str(extract.conv_rank)})
    reserve = len(json.dumps(metadata)) + 4096
    with SafetensorsWriter(path, entries, overwrite=overwrite, metadata_reserve=reserve,
                           protected_paths=[plan.recipe.base, *plan.recipe.models]) as writer:
        for (key, _, _), t in zip(entries, tensors):
            writer.write(key, t)
        writer.commit(metadata)
