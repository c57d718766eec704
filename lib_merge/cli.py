"""``python -m lib_merge``: merge, inspect, make synthetic checkpoints, serve the UI.

Errors are one line naming the file (and key) with exit code 2; a cancelled
merge (Ctrl-C) leaves no file and exits 130.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
from typing import Sequence

from .api import merge_to_file
from .checkpoint import open_checkpoint
from .engine import CancelToken, Progress, default_device
from .errors import MergeCancelled, MergeError, ParameterError
from .methods import METHODS
from .recipe import (DEFAULT_SEED, OUTPUT_DTYPES, RECIPE_METADATA_KEY, MergeRecipe, stored_recipe_from_metadata,
                     verify_input_hashes, with_overrides)


def _recipe_flags(p: argparse.ArgumentParser, models_help: str, method_default: str) -> None:
    """The recipe's flags, shared by ``merge`` and ``analyze`` (the same names, ranges and defaults)."""
    p.add_argument("--base", help="base checkpoint (theta0)")
    p.add_argument("--models", nargs="+", metavar="FILE", help=models_help)
    p.add_argument("--method", help=f"one of: {', '.join(METHODS)} ({method_default})")
    p.add_argument("--p", type=float, help="DARE drop rate, 0 <= p < 1 (default: the method's preset)")
    p.add_argument("--k", type=float, help="TIES keep fraction, 0 < k <= 1")
    p.add_argument("--alpha", type=float, help="weight of the merged delta, -1..2")
    p.add_argument("--vote-sgn", action=argparse.BooleanOptionalAction, default=None,
                   help="elect signs by counting them (TIES-SOUP); note sd-mecha >= 0.1.0 means the opposite")
    p.add_argument("--lambda", dest="lam", type=float, help="DARE rescale strength: delta * (1-p)^-lambda, 0..2")
    p.add_argument("--rescale", choices=["uniform", "unbiased"],
                   help="DARE rescale: uniform (1-p)^-lambda (default), or unbiased 1/(1-p^j) where j models "
                        "agree (TIES mean only; lambda unused)")
    p.add_argument("--epsilon", type=float,
                   help="DELLA: keep probability runs over 1-p-eps .. 1-p+eps by |delta| rank (default 0.1)")
    p.add_argument("--beta", type=float,
                   help="Breadcrumbs: fraction of the largest |delta| dropped per tensor (default 0.01)")
    p.add_argument("--seed", type=int, help=f"seed of the DARE masks (default {DEFAULT_SEED})")
    p.add_argument("--weights", nargs="+", type=float, metavar="W", help="one positive weight per model")
    p.add_argument("--merge", choices=["mean", "sum"], help="disjoint mean (TIES) or sum (task arithmetic)")
    p.add_argument("--alpha-unet", type=float, help="alpha for UNet keys")
    p.add_argument("--alpha-te", type=float, help="alpha for text-encoder keys")
    p.add_argument("--block-weights", help="alpha multiplier per block: 26 (SD1/SD2) or 20 (SDXL) values, BASE,IN00..,M00,OUT..")
    p.add_argument("--block-p", help="p per block, replacing --p there (same notation)")
    p.add_argument("--block-k", help="k per block, replacing --k there (same notation)")
    p.add_argument("--merge-vae", action=argparse.BooleanOptionalAction, default=None,
                   help="merge the VAE too (default: the base's VAE)")
    p.add_argument("--skip-mismatched", action=argparse.BooleanOptionalAction, default=None,
                   help="skip keys whose shapes differ instead of failing")
    p.add_argument("--allow-nonfinite", action=argparse.BooleanOptionalAction, default=None,
                   help="write a result even if it holds NaN/Inf")


def _merge_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge checkpoints into a new .safetensors file",
                       description="Merge a base and N models with DARE/TIES and write a safetensors file.")
    _recipe_flags(p, "models to merge into the base", "default dare_ties_soup")
    p.add_argument("--device", help="compute device: cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--processes", type=int, default=None, metavar="N",
                   help="CPU merges: processes to use (default: one per core; 1 = a single process; "
                        "at most the number of cores; with --out-lora: threads of one process)")
    p.add_argument("--dtype", choices=OUTPUT_DTYPES, help="output precision (default fp16, or the recipe's)")
    p.add_argument("--out", help="output .safetensors path (may be left out with --out-lora)")
    p.add_argument("--out-lora", metavar="FILE",
                   help="also (or only) write the merged delta as a kohya LoRA/LoCon file, by truncated SVD")
    p.add_argument("--lora-rank", type=int, default=32, metavar="R", help="rank of --out-lora's layers (default 32)")
    p.add_argument("--lora-conv-rank", type=int, metavar="R", help="rank of its 3x3 convs (default: --lora-rank)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _rerun_flags(p, "re-run the recipe stored in a merged checkpoint", "merge")


def _analyze_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="task-vector norms, similarity, sign conflicts (and a merge's shares) as "
                                       "analysis.json and PNG plots",
                       description="Measure what the models change relative to the base, per block: the size of "
                                   "each task vector, how alike they are, where their signs fight; with --method "
                                   "(or --recipe), also what that merge keeps of each model. Writes "
                                   "DIR/analysis.json and PNG plots into --out DIR; nothing else is written.")
    _recipe_flags(p, "models to analyse against the base (checkpoints or LoRA files)",
                  "default: none, only the inputs are analysed")
    p.add_argument("--device", help="compute device: cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--out", metavar="DIR", help="folder for analysis.json and the plots (created if missing)")
    p.add_argument("--no-plots", action="store_true", help="write analysis.json only")
    _rerun_flags(p, "analyse the merge recorded in a merged checkpoint", "analyse")


def _rerun_flags(p: argparse.ArgumentParser, recipe_help: str, verb: str) -> None:
    """--recipe, --ignore-hash and --quiet, the same for every command that runs a stored recipe."""
    p.add_argument("--recipe", metavar="FILE", help=f"{recipe_help}; flags given with it override it")
    p.add_argument("--ignore-hash", action="store_true",
                   help=f"with --recipe: {verb} even if an input's sha256 differs from the one recorded")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# --flag attribute -> (recipe field, conversion): the merge flags a recipe can hold.
_RECIPE_FLAGS = {
    "base": ("base", None), "models": ("models", None), "method": ("method", None), "p": ("p", None),
    "k": ("k", None), "alpha": ("alpha", None), "lam": ("lam", None), "vote_sgn": ("vote_sgn", None),
    "seed": ("seed", None), "weights": ("weights", None), "merge": ("merge", None),
    "epsilon": ("epsilon", None), "beta": ("beta", None), "rescale": ("rescale", None),
    "alpha_unet": ("alpha_unet", None), "alpha_te": ("alpha_te", None),
    "block_weights": ("block_alpha", lambda v: v.strip() or None),
    "block_p": ("block_p", lambda v: v.strip() or None), "block_k": ("block_k", lambda v: v.strip() or None),
    "merge_vae": ("vae", lambda v: "merge" if v else "base"),
    "skip_mismatched": ("on_mismatch", lambda v: "skip" if v else "error"),
    "allow_nonfinite": ("allow_nonfinite", None),
}


def _given(a: argparse.Namespace) -> dict[str, object]:
    """Recipe fields the user set explicitly on the command line (unset flags are None)."""
    out = {}
    for attr, (field, convert) in _RECIPE_FLAGS.items():
        value = getattr(a, attr)
        if value is not None:
            out[field] = convert(value) if convert else value
    return out


def _recipe_from_args(a: argparse.Namespace) -> tuple[MergeRecipe, str]:
    """The recipe and output dtype to merge with: from the flags, or a stored recipe they override."""
    given = _given(a)
    if not a.recipe:
        if a.ignore_hash:
            raise ParameterError("--ignore-hash only applies with --recipe FILE")
        if not a.base or not a.models:
            raise MergeError("--base and --models are required (or --recipe FILE)")
        given.setdefault("method", "dare_ties_soup")
        return MergeRecipe(**given), a.dtype or "fp16"
    search = [os.path.dirname(os.path.abspath(a.recipe))]
    with open_checkpoint(a.recipe) as ckpt:
        stored = stored_recipe_from_metadata(ckpt.metadata, search, source=a.recipe)
    recipe, changes = with_overrides(stored.recipe, given)
    dtype = stored.output_dtype or "fp16"
    if a.dtype and a.dtype != dtype:
        changes.append(f"output dtype: {dtype} -> {a.dtype}")
        dtype = a.dtype
    elif not stored.output_dtype:
        print(f"recipe: {a.recipe} records no output dtype; writing {dtype}")
    for line in changes:
        print(f"recipe override: {line}")
    scheme_note = stored.mask_scheme_note()
    if scheme_note:
        print(f"recipe: {scheme_note}")
    # inputs the user replaced are the user's choice; the rest must be the bytes that were merged
    kept = [item for item in stored.inputs
            if not (item.role == "base" and "base" in given) and not (item.role != "base" and "models" in given)]
    if a.ignore_hash:
        print("recipe: --ignore-hash: the inputs' sha256 are not checked against the recipe")
    elif kept:
        for note in verify_input_hashes(kept, hint=" (--ignore-hash merges it anyway)"):
            print(f"note: {note}", file=sys.stderr)
    return recipe, dtype


def check_device(name: str) -> str:
    """Refuse a device torch cannot use here, in one line (instead of torch's assertion deep in the merge)."""
    import torch
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if name == "cpu":
        return name
    if not match:
        raise ParameterError(f"--device {name!r}: not a device this tool runs on; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ParameterError(f"--device {name}: CUDA is not available here (this torch {torch.__version__} sees "
                             "no GPU); use --device cpu")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise ParameterError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return name


def check_processes(value: int | None) -> int | None:
    """``--processes``: refuse 0 and negatives; cap at the cores this process may use (more only thrash)."""
    if value is None:
        return None
    if value < 1:
        raise ParameterError(f"--processes {value}: give 1 or more (1 = a single process)")
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    if value > cores:
        print(f"note: --processes {value} capped at {cores}, the number of cores here", file=sys.stderr)
        return cores
    return value


def cmd_merge(a: argparse.Namespace) -> int:
    device = check_device(a.device) if a.device else default_device()
    processes = check_processes(a.processes)
    if not a.out and not a.out_lora:
        raise ParameterError(f"give --out FILE, --out-lora FILE, or both (see {_prog()} merge --help)")
    recipe, dtype = _recipe_from_args(a)
    cancel = CancelToken()
    bar = None

    def progress(ev: Progress) -> None:
        nonlocal bar
        if a.quiet:
            return
        if bar is None:  # created at the first key, so refused inputs print only the error line
            from tqdm import tqdm
            bar = tqdm(total=ev.bytes_total, unit="B", unit_scale=True, desc="merging", file=sys.stderr,
                       mininterval=0.5)
        bar.update(ev.bytes_done - bar.n)

    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        if a.out_lora:
            from .lora.extract import merge_to_lora
            if processes is not None and processes > 1:   # said, not silently dropped
                print(f"note: --out-lora merges in one process, with {processes} threads (--processes {processes}):"
                      " each layer is factored as it is merged", file=sys.stderr)
            report, _ = merge_to_lora(recipe, a.out_lora, a.lora_rank, a.lora_conv_rank, out_path=a.out,
                                      out_dtype=dtype, overwrite=a.overwrite, device=device, progress=progress,
                                      cancel=cancel, workers=processes)
        else:
            report = merge_to_file(recipe, a.out, out_dtype=dtype, overwrite=a.overwrite,
                                   device=device, progress=progress, cancel=cancel, processes=processes)
    except KeyboardInterrupt:
        from .writer import remove_live_temps
        remove_live_temps()   # an interrupt just after a temporary file was created: no writer owned it yet
        raise MergeCancelled("merge cancelled; nothing was written") from None
    finally:
        if bar is not None:
            bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(report.summary())
    return 0


def _progress_bar(quiet: bool, desc: str):
    """A Progress callback drawing a tqdm bar from the first key on, and a function closing it."""
    bar = None

    def progress(ev: Progress) -> None:
        nonlocal bar
        if quiet:
            return
        if bar is None:  # created at the first key, so refused inputs print only the error line
            from tqdm import tqdm
            bar = tqdm(total=ev.bytes_total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, mininterval=0.5)
        bar.update(ev.bytes_done - bar.n)

    def close() -> None:
        if bar is not None:
            bar.close()

    return progress, close


def cmd_analyze(a: argparse.Namespace) -> int:
    from .analysis import analyze, write_analysis
    device = check_device(a.device) if a.device else default_device()
    if not a.out:
        raise ParameterError(f"give --out DIR, the folder for analysis.json and the plots (see {_prog()} analyze --help)")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise ParameterError(f"--out {a.out}: exists and is not a folder")
    a.dtype = None
    with_merge = bool(a.method or a.recipe)
    knobs = [("--lambda" if attr == "lam" else "--" + attr.replace("_", "-")) for attr in _RECIPE_FLAGS
             if attr not in ("base", "models", "method", "skip_mismatched") and getattr(a, attr) is not None]
    if knobs and not with_merge:
        raise ParameterError(f"{', '.join(knobs)} describe{'s' if len(knobs) == 1 else ''} a merge: give --method "
                             "too (the merge to analyse), or leave them out to analyse the inputs alone")
    if with_merge:
        recipe, _ = _recipe_from_args(a)
        base, models = None, None
    else:
        if not a.base or not a.models:
            raise MergeError("--base and --models are required (or --recipe FILE)")
        recipe, base, models = None, a.base, a.models
    on_mismatch = "skip" if a.skip_mismatched else "error"
    cancel = CancelToken()
    progress, close = _progress_bar(a.quiet, "analysing")
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        result = analyze(base, models, recipe, device=device, progress=progress, cancel=cancel,
                         on_mismatch=on_mismatch)
    except KeyboardInterrupt:
        raise MergeCancelled("analysis cancelled; nothing was written") from None
    finally:
        close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    try:
        path = write_analysis(result, a.out)
    except OSError as exc:
        raise MergeError(f"cannot write analysis.json: {exc.strerror or exc}", a.out) from None
    print(f"wrote {path}")
    print(_analysis_summary(result))
    if a.no_plots:
        return 0
    try:
        from .analysis.plots import write_plots
    except ImportError as exc:   # matplotlib missing: the JSON is still there
        print(f"note: no plots ({exc}); install matplotlib to draw them", file=sys.stderr)
        return 0
    for plot in write_plots(result, a.out):
        print(f"wrote {plot}")
    return 0


def _analysis_summary(result: dict) -> str:
    """A few lines for the terminal: each model's task-vector size, the most alike pair, the share of a merge."""
    names = result["models"]
    lines = [f"{len(names)} model{'s' if len(names) != 1 else ''} against {result['base']} ({result['arch'].upper()}):"]
    for i, name in enumerate(names):
        line = f"  {name}: task vector norm {result['whole_norm'][name]:.4g}"
        share = (result.get("overall_share") or {}).get(name)
        if share is not None:
            line += f", {share * 100:.0f}% of the merged delta"
        lines.append(line)
    pairs = [(result["cosine"][i][j], names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))
             if result["cosine"][i][j] is not None]
    if pairs:
        cos, first, second = max(pairs)
        lines.append(f"  most alike: {first} and {second} (cosine {cos:.3f})")
    conflicts = {b: v for b, v in result["sign_conflict"].items() if v is not None}
    if conflicts and max(conflicts.values()) == 0:
        lines.append("  no sign conflicts: wherever two or more models change an element, they change it the same way")
    elif conflicts:
        block = max(conflicts, key=conflicts.get)
        lines.append(f"  signs fight most in {block}: {conflicts[block] * 100:.0f}% of the elements two or more "
                     "models change")
    return "\n".join(lines)


def _terminate(signum, frame) -> None:
    """SIGTERM (kill, a stopped job) ends the merge like Ctrl-C: the temporary file is deleted."""
    raise KeyboardInterrupt


def cmd_inspect(a: argparse.Namespace) -> int:
    with open_checkpoint(a.file) as ckpt:
        summary = ckpt.summary()
        raw = ckpt.metadata.get(RECIPE_METADATA_KEY)
        try:
            summary["recipe"] = json.loads(raw) if raw else None
        except ValueError:
            summary["recipe"] = None
        for key in ("sd_merge_recipe", "sd_merge_models"):
            if key in ckpt.metadata:
                summary.setdefault("a1111_metadata", {})[key] = json.loads(ckpt.metadata[key])
        from .lora.formats import looks_like_lora, lora_summary
        if looks_like_lora(ckpt):
            summary["lora"] = lora_summary(ckpt)
            if "dare_merge_lora" in ckpt.metadata:
                summary["lora"]["written_by_dare_merge"] = json.loads(ckpt.metadata["dare_merge_lora"])
    if a.json:
        print(json.dumps(summary, indent=2))
        return 0
    lora = summary.get("lora")
    kind = "LoRA" if lora else summary['architecture']   # a LoRA has no checkpoint architecture of its own
    print(f"{summary['file']}: {kind}, {summary['keys']} keys, {summary['size_bytes'] / 1e9:.2f} GB")
    if lora:
        print(_lora_line(lora))
    for name, comp in summary["components"].items():
        dtypes = ", ".join(f"{d} x{c}" for d, c in comp["dtypes"].items())
        print(f"  {name:6s} {comp['keys']:5d} keys {comp['params'] / 1e6:9.1f} M params  {dtypes}")
    recipe = summary["recipe"]
    if recipe:
        knobs = {k: v for k, v in recipe.items() if k not in ("base", "models", "format") and v is not None}
        print(f"  recipe: {json.dumps(knobs, sort_keys=True)}")
        print(f"  base: {recipe['base']['file']} {recipe['base'].get('hash', '')}")
        for m in recipe["models"]:
            print(f"  model: {m['file']} {m.get('hash', '')}")
    else:
        print("  no merge recipe stored")
    return 0


def _lora_line(lora: dict) -> str:
    if "error" in lora:
        return f"  LoRA that cannot be merged: {lora['error']}"
    kinds = ", ".join(f"{k} {n}" for k, n in lora["types"].items())
    parts = ", ".join(f"{k} {n}" for k, n in lora["parts"].items())
    ranks = lora["ranks"] and (f"rank {lora['ranks'][0]}" if lora["ranks"][0] == lora["ranks"][1]
                               else f"ranks {lora['ranks'][0]}..{lora['ranks'][1]}")
    made = {"sdxl": "SDXL", "sd1": "SD1.x", "sd2": "SD2.x", "sd1/sd2": "SD1/SD2"}.get(lora["made_for"], "unknown")
    line = f"  LoRA: {lora['modules']} modules ({kinds}; {parts}), {ranks}, made for {made}"
    written = lora.get("written_by_dare_merge")
    if written:
        worst = written.get("worst", {})
        line += f"; written from a merge, worst retained energy {worst.get('energy')} ({worst.get('module')})"
    return line


SYNTH_BAR_BYTES = 256 << 20   # files at least this big get a progress bar (a full-size SD1 file is 2.1 GB)


def _synth_progress(quiet: bool):
    """A progress callback drawing one tqdm bar per file being written, and a function closing the last one."""
    bars: dict[str, object] = {}

    def progress(path: str, done: int, total: int) -> None:
        if quiet or total < SYNTH_BAR_BYTES:
            return
        bar = bars.get(path)
        if bar is None:
            from tqdm import tqdm
            close()
            bar = bars[path] = tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path),
                                    file=sys.stderr, mininterval=0.5)
        bar.update(done - bar.n)  # type: ignore[attr-defined]

    def close() -> None:
        for bar in bars.values():
            bar.close()  # type: ignore[attr-defined]
        bars.clear()

    return progress, close


def cmd_synth(a: argparse.Namespace) -> int:
    from .synth import DEMO_SCALE_DOWN, demo_set_paths, synthetic_nbytes, write_demo_set, write_synthetic
    if a.full_size and a.scale_down is not None:
        raise ParameterError("give either --full-size or --scale-down, not both")
    scale = 1 if a.full_size else a.scale_down if a.scale_down is not None else DEMO_SCALE_DOWN
    if scale < 1:
        raise ParameterError(f"--scale-down {scale}: give 1 (full size) or more")
    if a.n_models < 0:
        raise ParameterError(f"--n-models {a.n_models}: give 0 or more")
    each = synthetic_nbytes(a.arch, a.dtype, scale)
    progress, close = _synth_progress(a.quiet)
    try:
        if a.demo_set:
            todo = [p for p, _, _ in demo_set_paths(a.demo_set, a.arch, a.n_models) if not os.path.exists(p)]
            if todo and not a.quiet:
                size = "full size" if scale == 1 else f"dimensions / {scale}"
                print(f"writing {len(todo)} synthetic {a.arch.upper()} checkpoints ({size}, {each / 1e6:,.0f} MB "
                      f"each) into {a.demo_set}", file=sys.stderr)
            for path in write_demo_set(a.demo_set, a.arch, a.n_models, scale, a.dtype, progress=progress):
                print(path)
            return 0
        if not a.out:
            raise MergeError("--out (or --demo-set DIR) is required")
        print(write_synthetic(a.out, a.arch, a.role, a.seed, a.base_seed, a.dtype, scale, progress=progress))
        return 0
    finally:
        close()


def cmd_ui(a: argparse.Namespace) -> int:
    from .ui.standalone import serve
    return serve(models_dir=a.models_dir, port=a.port, demo=a.demo)


def cmd_selftest(a: argparse.Namespace) -> int:
    from .selftest import main_selftest
    return main_selftest(a.device, a.arch, a.json, a.scale_down, a.quiet, a.quick)


def _prog() -> str:
    """The name the user typed: the installed ``dare-merge`` command, or ``python -m lib_merge``."""
    name = os.path.basename(sys.argv[0] if sys.argv else "")
    return "dare-merge" if name.startswith("dare-merge") else "python -m lib_merge"


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (with where to look) and exit 2, like every other error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=_prog(),
                                     description="Strict DARE/TIES checkpoint merging for Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)
    _merge_parser(sub)
    _analyze_parser(sub)
    p = sub.add_parser("inspect", help="architecture, components, dtypes and stored recipe of a checkpoint")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("synth", help="write synthetic checkpoints with real SD keys (for trying things out)")
    p.add_argument("--arch", choices=["sd1", "sd2", "sdxl"], default="sd1")
    p.add_argument("--role", choices=["base", "finetune"], default="base")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-seed", type=int, default=0)
    p.add_argument("--dtype", choices=OUTPUT_DTYPES, default="fp16")
    p.add_argument("--scale-down", type=int, metavar="N",
                   help="divide dimensions > 64 by N (default 8: about 34 MB per SD1 file, as the UI's --demo)")
    p.add_argument("--full-size", action="store_true",
                   help="real dimensions (2.1 GB per SD1 file, 6.9 GB per SDXL), with a progress bar")
    p.add_argument("--out")
    p.add_argument("--demo-set", metavar="DIR", help="write a base and --n-models fine-tunes into DIR")
    p.add_argument("--n-models", type=int, default=3)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = sub.add_parser("ui", help="serve the merge tab on 127.0.0.1 without a WebUI")
    p.add_argument("--models-dir", required=True, help="folder of checkpoints to choose from; merges are saved here")
    p.add_argument("--port", type=int, default=7870)
    p.add_argument("--demo", action="store_true", help="write small synthetic SD1 checkpoints there if it has none")
    p = sub.add_parser("selftest", help="check the merge on this machine's torch and device (a report to paste)",
                       description="Bit-identity of every method (CPU vs device), the trim threshold on "
                                   "SDXL-sized keys, where results end up, VRAM budget and release, the "
                                   "out-of-memory fallback and timings, on small synthetic checkpoints. "
                                   "Exit 0 when no check fails, 1 otherwise.")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--arch", choices=["sd1", "sd2", "sdxl"], default="sd1")
    p.add_argument("--json", metavar="FILE", help="where to write the JSON report (default dare-merge-selftest.json)")
    p.add_argument("--scale-down", type=int, help="divide the synthetic models' dimensions by this "
                                                  "(default 16 on CPU, 8 on CUDA; 1 = full size)")
    p.add_argument("--quick", action="store_true", help="identity checks on a sample of the keys (faster)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"merge": cmd_merge, "analyze": cmd_analyze, "inspect": cmd_inspect, "synth": cmd_synth, "ui": cmd_ui,
                "selftest": cmd_selftest}
    try:
        return handlers[args.command](args)
    except MergeCancelled as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:   # Ctrl-C outside a merge (synth, inspect): writers have removed their files
        print("error: interrupted", file=sys.stderr)
        return 130
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"error: a required package is missing or incompatible ({exc}); run bash .ci/setup-env",
              file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`dare-merge inspect x | head`): nothing to say, and nothing more to print
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except (OSError, ValueError, OverflowError, RecursionError, MemoryError) as exc:
        # last resort: bad input the library did not turn into a MergeError yet must still be one line
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {one_line(exc)} (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 2


DEBUG_ENV = "DARE_MERGE_DEBUG"


def one_line(exc: BaseException) -> str:
    """An exception as one line: OSError with its file, others with their type and first line."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
