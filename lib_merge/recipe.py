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
import math
import os
import re
from dataclasses import dataclass, field, fields, replace

from .arch import BLOCK_COUNTS
from .errors import ParameterError
from .masks import MASK_SCHEME
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
    "epsilon": (0.0, 0.5, True, False),   # and 1 - p - eps > 0, 1 - p + eps <= 1 (della.check_epsilon)
    "beta": (0.0, 1.0, True, False),
}
KNOB_NAMES = {"p": "p (DARE drop rate)", "k": "k (TIES keep fraction)",
              "lam": "lambda (DARE rescale strength)", "alpha": "alpha",
              "epsilon": "epsilon (DELLA keep-probability spread)",
              "beta": "beta (Breadcrumbs: largest fraction dropped)"}
RESCALES = ("uniform", "unbiased")


FLOAT32_MAX = 3.4028234663852886e38
BLOCK_LABELS = {"block_alpha": "block weights", "block_p": "block p", "block_k": "block k"}


def split_block_text(text: str) -> list[str]:
    """'1, 0.5 0' -> ['1', '0.5', '0'] (the block notation: commas and/or spaces)."""
    return [t for t in re.split(r"[,\s]+", text.strip()) if t]


def check_block_values(name: str, text: str | None) -> None:
    """Refuse a non-numeric or out-of-range per-block value before any file is opened, naming it."""
    if text is None:
        return
    what = BLOCK_LABELS[name]
    if not isinstance(text, str):
        raise ParameterError(f"{what} must be a text of comma-separated numbers, got {text!r}")
    tokens = split_block_text(text)
    labels = _block_labels_for(len(tokens))
    for i, token in enumerate(tokens):
        where = f"value {i + 1}" + (f" ({labels[i]})" if labels else "")
        try:
            value = float(token)
        except ValueError:
            raise ParameterError(f"{what}: {where} is {token!r}, not a number") from None
        if not math.isfinite(value):
            raise ParameterError(f"{what}: {where} is {token!r}, not a finite number")
        knob = {"block_p": "p", "block_k": "k"}.get(name)
        if knob:
            try:
                check_range(knob, value)
            except ParameterError as exc:
                raise ParameterError(f"{what}: {where}: {exc}") from None


def _block_labels_for(count: int) -> list[str]:
    """The block names (BASE, IN00, ..., OUT11) for a list of ``count`` values, so a refusal names the
    block a user typed; empty when the count fits no architecture (that is refused later, naming both)."""
    from .arch import BLOCK_COUNTS, block_labels
    for arch, n in BLOCK_COUNTS.items():
        if n == count:
            return block_labels(arch)
    return []


def check_new_knobs(r: "MergeRecipe", spec: MethodSpec) -> None:
    """The cross-knob rules of DELLA's epsilon, the unbiased rescale and Model Stock, in one line each."""
    from .della import check_epsilon
    if spec.kind == "della":
        why = check_epsilon(float(r.p), float(r.epsilon if r.epsilon is not None else 0.0))
        if why:
            raise ParameterError(why)
    if r.rescale not in RESCALES:
        raise ParameterError(f"rescale must be 'uniform' or 'unbiased', got {r.rescale!r}")
    if r.rescale == "unbiased":
        if spec.kind == "della":
            raise ParameterError(f"rescale unbiased: {spec.name} rescales each kept element by its own keep "
                                 "probability; use rescale uniform")
        if spec.kind == "delta" and (not spec.elect or r.merge != "mean"):
            raise ParameterError(f"rescale unbiased applies to the TIES disjoint mean (a sign election with "
                                 f"merge = mean); {spec.name} with merge = {r.merge} "
                                 + ("has no election" if not spec.elect else "sums, where (1 - p)^-1 is already "
                                    "unbiased (lambda = 1)"))
    if len(r.models) < spec.min_models:
        raise ParameterError(f"{spec.name} needs at least {spec.min_models} models besides the base; "
                             f"got {len(r.models)}")


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
    epsilon: float | None = None             # DELLA: keep probability spread (None = the method's)
    beta: float | None = None                # Breadcrumbs: largest fraction of |delta| dropped
    rescale: str | None = None               # "uniform" (1-p)^-lambda or "unbiased" 1/(1-p^j); None = uniform
    # Not a knob: (models, their mask identities (masks.model_mask_ids)), filled in by the engine from the
    # files' contents when DARE masks are drawn, so worker processes need not hash the files again; used
    # only while ``models`` is still that list.
    mask_ids: tuple | None = field(default=None, repr=False, compare=False)

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
            epsilon=self.epsilon if self.epsilon is not None else d.get("epsilon"),
            beta=self.beta if self.beta is not None else d.get("beta"),
            rescale=self.rescale or "uniform",
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
        for name in ("p", "k", "lam", "alpha", "epsilon", "beta"):
            if getattr(r, name) is not None:
                check_range(name, float(getattr(r, name)))
        check_new_knobs(r, spec)
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
            if w > FLOAT32_MAX:
                raise ParameterError(f"weight {w:g} of model {i + 1} ({os.path.basename(r.models[i])}) is too "
                                     f"large: the merge computes in float32 (at most {FLOAT32_MAX:.3g})")
        if math.fsum(r.weights) > FLOAT32_MAX:
            raise ParameterError(f"the weights add up to {math.fsum(r.weights):g}, more than float32 holds "
                                 f"({FLOAT32_MAX:.3g}); only their ratios matter in a mean, so scale them down")
        for name in ("block_alpha", "block_p", "block_k"):
            check_block_values(name, getattr(r, name))
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
                effect = spec.zero_delta_counts
                if spec.kind in ("delta", "della") and not spec.elect:
                    effect = ("its delta is zero and, without a sign election, it still counts: "
                              + ("the merged delta shrinks to N/(N + 1) of what it would be (merge = mean)"
                                 if r.merge == "mean" else "with merge = sum it changes nothing"))
                elif spec.kind in ("delta", "della"):
                    effect = "its delta is zero, so it changes neither the sign election nor the TIES mean"
                    if r.merge == "sum":
                        effect = "its delta is zero, so it changes neither the sign election nor the sum"
                notes.append(f"model {i + 1} ({os.path.basename(path)}) is the base: {effect}")
            if real in seen:
                notes.append(f"model {i + 1} ({os.path.basename(path)}) repeats model {seen[real] + 1}: "
                             "it counts twice (a doubled vote and weight), with its own DARE mask")
            seen.setdefault(real, i)
        if spec.kind in ("delta", "della") and not spec.trim and r.k != 1.0:
            notes.append(f"k = {r.k:g} is ignored: {spec.name} does not trim")
        if spec.kind not in ("delta", "della"):
            ignored = [n for n in ("p", "k") if getattr(r, n) != {"p": 0.0, "k": 1.0}[n]]
            if ignored:
                notes.append(f"{', '.join(ignored)} ignored: {spec.name} uses neither DARE nor TIES")
        elif "p" not in spec.uses and r.p != 0.0:
            notes.append(f"p = {r.p:g} is ignored: {spec.name} drops by magnitude, not at random")
        for knob in ("epsilon", "beta"):
            if getattr(r, knob) is not None and knob not in spec.uses:
                notes.append(f"{knob} = {getattr(r, knob):g} is ignored: {spec.name} does not use it")
        if r.rescale == "unbiased" and "rescale" not in spec.uses:
            notes.append(f"rescale unbiased is ignored: {spec.name} has no DARE rescale")
        elif r.rescale == "unbiased" and r.lam != 1.0:
            notes.append(f"lambda = {r.lam:g} is not used: the unbiased rescale divides by 1 - p^j instead")
        return notes

    # -- serialisation
    def params_dict(self) -> dict:
        """The resolved knobs (no paths), in a stable order (epsilon/beta only for methods that have them)."""
        r = self.resolved()
        out = {f.name: getattr(r, f.name) for f in fields(r) if f.name not in ("base", "models", "mask_ids")
               and not (f.name in ("epsilon", "beta") and getattr(r, f.name) is None)}
        return out

    def to_json_dict(self, inputs: dict | None = None) -> dict:
        """The recipe as stored in a merged file: knobs, input names and hashes."""
        r = self.resolved()
        doc = {"format": RECIPE_FORMAT, **self.params_dict(), "mask_scheme": MASK_SCHEME,
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
        check_recipe_doc(doc)
        known = {f.name for f in fields(cls)} - {"base", "models", "mask_ids"}
        kwargs = {k: v for k, v in doc.items() if k in known}
        return cls(base=locate_input(doc["base"], search_dirs),
                   models=[locate_input(m, search_dirs) for m in doc["models"]], **kwargs)

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
                n = len(split_block_text(text))
                if n != BLOCK_COUNTS[arch]:
                    raise ParameterError(f"{name.replace('_', ' ')}: {arch.upper()} takes "
                                         f"{BLOCK_COUNTS[arch]} values, got {n}")


# Stored recipe fields: the JSON types each may hold (None = null allowed); required ones have no default.
_NUMBER = (int, float)
_FIELD_TYPES: dict[str, tuple] = {
    "method": (str,), "p": (*_NUMBER, None), "k": (*_NUMBER, None), "alpha": (*_NUMBER, None),
    "lam": (*_NUMBER, None), "vote_sgn": (bool, None), "seed": (int,), "weights": (list, None),
    "merge": (str, None), "alpha_unet": (*_NUMBER, None), "alpha_te": (*_NUMBER, None),
    "block_alpha": (str, None), "block_p": (str, None), "block_k": (str, None), "vae": (str,),
    "on_mismatch": (str,), "allow_nonfinite": (bool,), "output_dtype": (str,),
    "epsilon": (*_NUMBER, None), "beta": (*_NUMBER, None), "rescale": (str, None), "mask_scheme": (int,),
}
_TYPE_WORDS = {str: "a text", int: "an integer", float: "a number", bool: "true/false", list: "a list",
               None: "null"}


def _type_ok(value: object, allowed: tuple) -> bool:
    if value is None:
        return None in allowed
    if isinstance(value, bool):       # JSON true is not a number here
        return bool in allowed
    return any(t is not None and t is not bool and isinstance(value, t) for t in allowed)


def _describe(allowed: tuple) -> str:
    words = []
    for t in allowed:
        word = _TYPE_WORDS[t]
        if word not in words and not (t is int and float in allowed):
            words.append(word)
    return " or ".join(words)


def _check_input_entry(entry: object, where: str) -> None:
    if not isinstance(entry, dict):
        raise ParameterError(f"stored recipe: {where} must be an object with a 'file' name, got {entry!r:.60}")
    if not isinstance(entry.get("file"), str) or not entry["file"]:
        raise ParameterError(f"stored recipe: {where} has no 'file' name")
    for key in ("path", "sha256", "hash"):
        if key in entry and not isinstance(entry[key], str):
            raise ParameterError(f"stored recipe: {where}.{key} must be a text, got {entry[key]!r:.60}")


def check_recipe_doc(doc: object) -> None:
    """Refuse stored recipe JSON with missing fields or wrong types, naming the field (one line)."""
    if not isinstance(doc, dict):
        raise ParameterError(f"stored recipe is not a JSON object (got {type(doc).__name__})")
    if doc.get("format") != RECIPE_FORMAT:
        raise ParameterError(f"not a {RECIPE_FORMAT} recipe (format {doc.get('format')!r:.60})")
    for name in ("method", "base", "models"):
        if name not in doc:
            raise ParameterError(f"stored recipe: field '{name}' is missing")
    for name, allowed in _FIELD_TYPES.items():
        if name in doc and not _type_ok(doc[name], allowed):
            raise ParameterError(f"stored recipe: field '{name}' must be {_describe(allowed)}, "
                                 f"got {doc[name]!r:.60}")
    if isinstance(doc.get("weights"), list):
        for i, w in enumerate(doc["weights"]):
            if not _type_ok(w, _NUMBER):
                raise ParameterError(f"stored recipe: weights[{i}] must be a number, got {w!r:.60}")
    if "output_dtype" in doc and doc["output_dtype"] not in OUTPUT_DTYPES:
        raise ParameterError(f"stored recipe: output_dtype must be one of {', '.join(OUTPUT_DTYPES)}, "
                             f"got {doc['output_dtype']!r:.60}")
    _check_input_entry(doc["base"], "base")
    if not isinstance(doc["models"], list) or not doc["models"]:
        raise ParameterError(f"stored recipe: 'models' must be a non-empty list, got {doc['models']!r:.60}")
    for i, entry in enumerate(doc["models"]):
        _check_input_entry(entry, f"models[{i}]")


def locate_input(entry: dict, search_dirs: list[str] | None = None) -> str:
    """Where a stored input is now: its recorded path if it exists, else its name in ``search_dirs``."""
    candidates = [entry.get("path")] + [os.path.join(d, entry["file"]) for d in (search_dirs or [])]
    for c in candidates:
        if c and os.path.isfile(c):
            return c
    return entry.get("path") or entry["file"]


@dataclass
class StoredInput:
    """One input named in a stored recipe: where it is now and the hash recorded when it was merged."""

    role: str            # "base" or "model 2"
    path: str
    sha256: str | None   # full hex digest, when recorded
    short: str | None    # A1111 short hash (first 10 hex digits), when recorded


@dataclass
class StoredRecipe:
    """A recipe read back from a merged file, with what re-running it exactly needs besides the knobs."""

    recipe: MergeRecipe
    output_dtype: str | None
    inputs: list[StoredInput]
    mask_scheme: int = MASK_SCHEME   # 1: merged before masks followed the models' contents

    def mask_scheme_note(self) -> str | None:
        """What a re-run of a file merged with older masks will do, or None when it reproduces the file."""
        if self.mask_scheme == MASK_SCHEME:
            return None
        r = self.recipe.resolved()
        random = (r.p or 0.0) > 0.0 or bool(r.block_p) or r.spec.kind == "della"
        if not random:
            return None
        return (f"this file was merged with DARE mask scheme {self.mask_scheme} (masks by each model's place in "
                f"the list); this version draws them by each model's content (scheme {MASK_SCHEME}), so the "
                "re-run will differ from the file in the dropped elements (statistically the same merge)")


def _doc_from_metadata(metadata: dict[str, str]) -> object:
    raw = metadata.get(RECIPE_METADATA_KEY)
    if not raw:
        raise ParameterError("this file holds no dare-merge recipe in its metadata")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ParameterError(f"the stored recipe is not valid JSON: {exc}") from None


def recipe_from_metadata(metadata: dict[str, str], search_dirs: list[str] | None = None) -> MergeRecipe:
    """The recipe stored in a merged checkpoint's metadata (inputs located as :func:`locate_input` does)."""
    return MergeRecipe.from_json_dict(_doc_from_metadata(metadata), search_dirs)


def stored_recipe_from_metadata(metadata: dict[str, str], search_dirs: list[str] | None = None,
                                source: str | None = None) -> StoredRecipe:
    """The stored recipe, its output dtype and its inputs' recorded hashes; errors name ``source``."""
    try:
        doc = _doc_from_metadata(metadata)
        recipe = MergeRecipe.from_json_dict(doc, search_dirs)
    except ParameterError as exc:
        raise ParameterError(str(exc), source) from None
    entries = [("base", doc["base"])] + [(f"model {i + 1}", m) for i, m in enumerate(doc["models"])]
    paths = [recipe.base, *recipe.models]
    inputs = [StoredInput(role, path, (entry.get("sha256") or "").lower() or None,
                          (entry.get("hash") or "").lower() or None)
              for (role, entry), path in zip(entries, paths)]
    scheme = doc.get("mask_scheme", 1)
    return StoredRecipe(recipe, doc.get("output_dtype"), inputs, scheme)


def _shown(field: str, value: object) -> str:
    if value is None:
        return "unset"
    if field in ("base",):
        return os.path.basename(str(value))
    if field == "models":
        return ", ".join(os.path.basename(str(m)) for m in value)  # type: ignore[union-attr]
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(_shown("", v) for v in value)
    return str(value)


def with_overrides(recipe: MergeRecipe, overrides: dict[str, object]) -> tuple[MergeRecipe, list[str]]:
    """The stored recipe with the fields the user gave explicitly replaced; one line per changed field.

    Knobs the user did not give keep their stored (resolved) values, so a
    re-run changes exactly what was asked for and nothing else.  When the
    number of models changes and no weights are given, stored weights that
    no longer fit fall back to 1 each (and that is reported too).
    """
    changes = []
    values = {}
    for name, new in overrides.items():
        old = getattr(recipe, name)
        values[name] = new
        if new != old:
            changes.append(f"{name}: {_shown(name, old)} -> {_shown(name, new)}")
    updated = replace(recipe, **values)
    if "models" in values and "weights" not in values and updated.weights \
            and len(updated.weights) != len(updated.models):
        changes.append(f"weights: {_shown('weights', updated.weights)} -> 1 each (the number of models changed)")
        updated = replace(updated, weights=None)
    return updated, changes


def verify_input_hashes(inputs: list[StoredInput], threads: int = 4, hint: str = "") -> list[str]:
    """Check each input against its recorded sha256; raise on the first mismatch, return notes.

    A re-run is only "exactly the same merge" if the inputs are the same
    bytes: a file of the same name that was re-downloaded, pruned or
    converted since would silently give another result.
    """
    from concurrent.futures import ThreadPoolExecutor

    from .errors import CheckpointError
    from .hashing import sha256_file

    notes, todo = [], []
    for item in inputs:
        if not (item.sha256 or item.short):
            notes.append(f"{item.path}: no hash recorded for the {item.role}; its contents are not verified")
        elif not os.path.isfile(item.path):
            raise CheckpointError(f"the recipe's {item.role} is not found (looked by path and by name "
                                  "next to the recipe file)", item.path)
        else:
            todo.append(item)

    def digest(item: StoredInput) -> str:
        try:
            return sha256_file(item.path)
        except OSError as exc:
            raise CheckpointError(f"cannot read the recipe's {item.role}: {exc.strerror or exc}", item.path) \
                from None

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(todo) or 1))) as pool:
        found = list(pool.map(digest, todo))
    for item, sha in zip(todo, found):
        recorded = item.sha256 or item.short
        if not sha.startswith(recorded):
            raise CheckpointError(f"sha256 {sha[:10]}… differs from the one the recipe recorded for the "
                                  f"{item.role} ({recorded[:10]}…): not the file that was merged{hint}", item.path)
    return notes


__all__ = ["MergeRecipe", "recipe_from_metadata", "stored_recipe_from_metadata", "StoredRecipe", "StoredInput",
           "with_overrides",
           "verify_input_hashes", "check_recipe_doc", "check_block_values", "check_range", "RANGES",
           "DEFAULT_SEED", "OUTPUT_DTYPES", "RECIPE_METADATA_KEY"]
