"""Write the benchmark's synthetic checkpoints into benchmarks/work/<arch>/.

The inputs are made by the project's own generator (lib_merge.synth), full
size (scale_down=1) and fp16, so they carry the real SD1/SDXL key names and
shapes that both engines see in practice.  Files that already exist are kept
(same arguments, same bytes), so a second run costs nothing.

    python benchmarks/make_inputs.py --arch sd1 --n 8
    python benchmarks/make_inputs.py --arch sdxl --n 3     # 6.9 GB a file
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORK = os.path.join(HERE, "work")
sys.path.insert(0, ROOT)

# Full-size fp16 bytes per file (measured), for the disk check before writing.
FILE_BYTES = {"sd1": 2_133_000_000, "sd2": 2_600_000_000, "sdxl": 6_940_000_000}
MAX_MODELS = {"sd1": 8, "sd2": 8, "sdxl": 3}


def input_paths(arch: str, n: int, scale_down: int = 1) -> tuple[str, list[str]]:
    """(base, [finetune 1..n]) paths for an arch; shared with run.py."""
    folder = os.path.join(WORK, arch if scale_down == 1 else f"{arch}-s{scale_down}")
    base = os.path.join(folder, "base.safetensors")
    models = [os.path.join(folder, f"finetune{i}.safetensors") for i in range(1, n + 1)]
    return base, models


def generator_stamp() -> str:
    """Hash of the generator's source: files made by different versions of it may not fit together."""
    with open(os.path.join(ROOT, "lib_merge", "synth.py"), "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()[:12]


def _manifest(folder: str) -> tuple[str, dict]:
    path = os.path.join(folder, "generator.json")
    try:
        with open(path, encoding="utf-8") as handle:
            return path, json.load(handle)
    except (OSError, ValueError):
        return path, {}


def ensure_inputs(arch: str, n: int, scale_down: int = 1, verbose: bool = True,
                  regenerate: bool = False) -> tuple[str, list[str]]:
    """Write the base and n fine-tunes that are missing; refuse when the disk would fill.

    A manifest records which version of lib_merge/synth.py wrote each file; a
    set mixing versions is reported (its base and fine-tunes may disagree on
    keys the generator changed), and ``regenerate`` rewrites the set.
    """
    from lib_merge.synth import write_synthetic

    base, models = input_paths(arch, n, scale_down)
    folder = os.path.dirname(base)
    os.makedirs(folder, exist_ok=True)
    manifest_path, manifest = _manifest(folder)
    if regenerate:
        for path in [base, *models]:
            if os.path.exists(path):
                os.remove(path)
            manifest.pop(os.path.basename(path), None)
    todo = [(p, "base", 0) if p == base else (p, "finetune", i)
            for i, p in enumerate([base, *models]) if not os.path.exists(p)]
    need = len(todo) * FILE_BYTES.get(arch, 7e9) // (scale_down * scale_down)
    free = shutil.disk_usage(os.path.dirname(base)).free
    # Keep room for three outputs (floor, ours, sd-mecha) plus 5 GB for everyone else.
    margin = 3 * FILE_BYTES.get(arch, 7e9) // (scale_down * scale_down) + 5_000_000_000
    if todo and need + margin > free:
        raise SystemExit(f"not enough disk for {len(todo)} {arch} files: need ~{(need + margin) / 1e9:.1f} GB "
                         f"(with outputs and a 5 GB margin), {free / 1e9:.1f} GB free under {WORK}")
    for path, role, seed in todo:
        started = time.perf_counter()
        write_synthetic(path, arch=arch, role=role, seed=seed, base_seed=0, dtype="fp16",
                        scale_down=scale_down, overwrite=False)
        manifest[os.path.basename(path)] = generator_stamp()
        with open(manifest_path, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1, sort_keys=True)
        if verbose:
            print(f"wrote {path} ({os.path.getsize(path) / 1e9:.2f} GB) in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    stamps = {manifest.get(os.path.basename(p), "unrecorded") for p in [base, *models]}
    if len(stamps) > 1 and verbose:
        print(f"warning: {folder} mixes files from {len(stamps)} versions of lib_merge/synth.py {sorted(stamps)}; "
              "rerun with --regenerate if the generator changed keys that matter", flush=True)
    return base, models


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["sd1", "sd2", "sdxl"], default="sd1")
    ap.add_argument("--n", type=int, default=None, help="fine-tunes to write (default 8 for SD1, 3 for SDXL)")
    ap.add_argument("--scale-down", type=int, default=1, help="divide dimensions > 64 (1 = full size)")
    ap.add_argument("--regenerate", action="store_true", help="rewrite the set even where files exist")
    a = ap.parse_args()
    n = a.n if a.n is not None else MAX_MODELS[a.arch]
    base, models = ensure_inputs(a.arch, n, a.scale_down, regenerate=a.regenerate)
    for path in [base, *models]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
