"""A merge recipe: what to merge, how, and how to write it down.

The recipe is the one object the CLI, the tab, the HTTP route and the XYZ
axes fill in.  It is validated before any file is opened, it resolves the
method's preset values for knobs the user left unset, and it serialises to the
JSON stored in a merged checkpoint, from which the same merge can be re-run
bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, fields, replace

from .arch import BLOCK_COUNTS
from .errors import ParameterError
from .methods import MethodSpec, get_method

RECIPE_FORMAT = "sd-webui-dare-merge/1"
RECIPE_METADATA_KEY = "dare_merge_recipe"
DEFAULT_SEED = 42
OUTPUT_DTYPES = ("fp16", "bf16", "fp32")

# (lowest, highest, lowest included, highest included) of each knob
RANGES = {
    "p": (0.0, 1.0, True, False),
    "k": (0.0, 1.0, False, True),
    "lam": (0.0, 2.0, True, True),
    "alpha": (-1.0, 2.0, True, True),
}
KNOB_NAMES = {"p": "p (DARE drop rate)", "k": "k (TIES keep fraction)",
              "lam": "lambda (DARE rescale strength)", "alpha": "alpha"}


def check_range(name: str, value: float) -> None:
    """Refuse a knob value outside its documented range, naming it."""
    lo, hi, lo_in, hi_in = RANGES[name]
    ok = (value >= lo if lo_in else value > lo) and (value <= hi if hi_in else value < hi)
    if not ok or value != value:
        interval = f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
        raise ParameterError(f"{KNOB_NAMES[name]} = {value:g} is outside {interval}")


@dataclass
class MergeRecipe:
    """Everything that determines a merge's result (paths are where to find the inputs)."""

    method: str
    base: str
    models: list[str]
    p: float | None = None
    k: float | None = None
    alpha: float | None = None
    lam: float | None = None
    vote_sgn: bool | None = None
    seed: int = DEFAULT_SEED
    weights: list[float] | None = None
    merge: str | None = None                 # "mean" / "sum"; None = the method's
    alpha_unet: float | None = None          # per-component alpha (None = alpha)
    alpha_te: float | None = None
    block_alpha: str | None = None           # alpha multiplier per block: 26 (SD1/SD2) or 20 (SDXL) values
    block_p: str | None = None               # p per block (replaces p there)
    block_k: str | None = None               # k per block (replaces k there)
    vae: str = "base"                        # "base" (copy) or "merge"
    on_mismatch: str = "error"               # shape mismatch: "error" or "skip"
    allow_nonfinite: bool = False

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method)

    def resolved(self) -> "MergeRecipe":
        """A copy with the method's canonical name and every unset knob filled in."""
        spec = self.spec
        d = spec.defaults
        vote = spec.forced_vote_sgn if spec.forced_vote_sgn is not None else (
            self.vote_sgn if self.vote_sgn is not None else d.get("vote_sgn", False))
        return replace(
            self, method=spec.name,
            p=self.p if self.p is not None else d.get("p", 0.0),
            k=self.k if self.k is not None else d.get("k", 1.0),
            alpha=self.alpha if self.alpha is not None else d.get("alpha", 1.0),
            lam=self.lam if self.lam is not None else d.get("lam", 1.0),
            vote_sgn=bool(vote),
            weights=list(self.weights) if self.weights else [1.0] * len(self.models),
            merge=self.merge or spec.default_merge,
            models=list(self.models))

    def validate(self) -> list[str]:
        """Refuse impossible values before any work; return notes worth telling the user."""
        try:
            spec = self.spec
        except KeyError as exc:
            raise ParameterError(str(exc.args[0])) from exc
        r = self.resolved()
        if not r.models:
            raise ParameterError("no models to merge: pick at least one model besides the base")
        if not r.base:
            raise ParameterError("no base checkpoint given")
        for name in ("p", "k", "lam", "alpha"):
            check_range(name, float(getattr(r, name)))
        for name in ("alpha_unet", "alpha_te"):
            value = getattr(r, name)
            if value is not None:
                check_range("alpha", float(value))
        if len(r.weights) != len(r.models):
            raise ParameterError(f"{len(r.weights)} weights given for {len(r.models)} models")
        for i, w in enumerate(r.weights):
            if not w > 0 or w != w or w == float("inf"):
                raise ParameterError(f"weight {w:g} of model {i + 1} ({os.path.basename(r.models[i])}) "
                                     "must be a positive number")
        if r.merge not in ("mean", "sum"):
            raise ParameterError(f"merge must be 'mean' or 'sum', got {r.merge!r}")
        if r.vae not in ("base", "merge"):
            raise ParameterError(f"vae must be 'base' or 'merge', got {r.vae!r}")
        if r.on_mismatch not in ("error", "skip"):
            raise ParameterError(f"on_mismatch must be 'error' or 'skip', got {r.on_mismatch!r}")
        if not isinstance(r.seed, int) or isinstance(r.seed, bool) or r.seed < 0:
            raise ParameterError(f"seed must be an integer >= 0, got {r.seed!r}")
        if spec.kind == "slerp" and len(r.models) != 1:
            raise ParameterError(f"slerp interpolates the base and exactly one model; got {len(r.models)} models")
        return self._notes(r, spec)

    @staticmethod
    def _notes(r: "MergeRecipe", spec: MethodSpec) -> list[str]:
        notes = []
        base_real = os.path.realpath(r.base)
        seen: dict[str, int] = {}
        for i, path in enumerate(r.models):
            real = os.path.realpath(path)
            if real == base_real:
                notes.append(f"model {i + 1} ({os.path.basename(path)}) is the base: its delta is zero, so it "
                             "changes neither the sign election nor the TIES mean"
                             + (" (it does weigh in the weighted sum)" if spec.kind == "weighted_sum" else ""))
            if real in seen:
                notes.append(f"model {i + 1} ({os.path.basename(path)}) repeats model {seen[real] + 1}: "
                             "it counts twice (a doubled vote and weight), with its own DARE mask")
            seen.setdefault(real, i)
        if spec.kind == "delta" and not spec.trim and r.k != 1.0:
            notes.append(f"k = {r.k:g} is ignored: {spec.name} does not trim")
        if spec.kind != "delta":
            ignored = [n for n in ("p", "k") if getattr(r, n) != {"p": 0.0, "k": 1.0}[n]]
            if ignored:
                notes.append(f"{', '.join(ignored)} ignored: {spec.name} uses neither DARE nor TIES")
        return notes

    # -- serialisation
    def params_dict(self) -> dict:
        """The resolved knobs (no paths), in a stable order."""
        r = self.resolved()
        out = {f.name: getattr(r, f.name) for f in fields(r) if f.name not in ("base", "models")}
        return out

    def to_json_dict(self, inputs: dict | None = None) -> dict:
        """The recipe as stored in a merged file: knobs, input names and hashes."""
        r = self.resolved()
        doc = {"format": RECIPE_FORMAT, **self.params_dict(),
               "base": {"file": os.path.basename(r.base), "path": os.path.abspath(r.base)},
               "models": [{"file": os.path.basename(m), "path": os.path.abspath(m)} for m in r.models]}
        if inputs:
            for entry in [doc["base"], *doc["models"]]:
                info = inputs.get(entry["path"])
                if info:
                    entry.update(info)
        return doc

    @classmethod
    def from_json_dict(cls, doc: dict, search_dirs: list[str] | None = None) -> "MergeRecipe":
        """Rebuild a recipe from stored JSON; inputs are looked up by path, then by name in search_dirs."""
        if doc.get("format") != RECIPE_FORMAT:
            raise ParameterError(f"not a {RECIPE_FORMAT} recipe (format {doc.get('format')!r})")
        known = {f.name for f in fields(cls)} - {"base", "models"}
        kwargs = {k: v for k, v in doc.items() if k in known}

        def locate(entry: dict) -> str:
            candidates = [entry.get("path")] + [os.path.join(d, entry["file"]) for d in (search_dirs or [])]
            for c in candidates:
                if c and os.path.isfile(c):
                    return c
            return entry.get("path") or entry["file"]

        return cls(base=locate(doc["base"]), models=[locate(m) for m in doc["models"]], **kwargs)

    def recipe_hash(self, inputs: dict | None = None) -> str:
        """A short id of the merge result: same knobs and same input contents -> same id."""
        doc = self.to_json_dict(inputs)
        for entry in [doc["base"], *doc["models"]]:
            entry.pop("path", None)
            if "sha256" in entry:
                entry.pop("file", None)
        canon = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:10]

    def block_count_ok(self, arch: str) -> None:
        for name in ("block_alpha", "block_p", "block_k"):
            text = getattr(self, name)
            if text:
                n = len([t for t in text.replace(",", " ").split() if t])
                if n != BLOCK_COUNTS[arch]:
                    raise ParameterError(f"{name.replace('_', ' ')}: {arch.upper()} takes "
                                         f"{BLOCK_COUNTS[arch]} values, got {n}")


def recipe_from_metadata(metadata: dict[str, str], search_dirs: list[str] | None = None) -> MergeRecipe:
    raw = metadata.get(RECIPE_METADATA_KEY)
    if not raw:
        raise ParameterError("this file holds no dare-merge recipe in its metadata")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ParameterError(f"the stored recipe is not valid JSON: {exc}") from exc
    return MergeRecipe.from_json_dict(doc, search_dirs)


__all__ = ["MergeRecipe", "recipe_from_metadata", "check_range", "RANGES", "DEFAULT_SEED",
           "OUTPUT_DTYPES", "RECIPE_METADATA_KEY"]
