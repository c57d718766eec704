"""HTTP routes inside the WebUI: merge (hot-load and/or save), status, restore, cancel.

Registered from ``script_callbacks.on_app_started`` when the WebUI serves its
API (``--api`` or ``--nowebui``), the same condition as A1111's own
``/sdapi/v1`` routes, and behind the same HTTP basic auth when
``--api-auth user:pass[,user2:pass2]`` is given (checked as
``modules/api/api.py`` checks it).  Bodies and answers are plain JSON (no
pydantic models: A1111 ships pydantic 1, Forge pydantic 2).

``POST /dare-merge/v1/merge`` body::

    {"base": "<checkpoint title, name or hash>", "models": ["...", ...],
     "method": "dare_ties", "p": 0.5, "k": 1.0, "alpha": 1.0, "lam": 1.0, "vote_sgn": false,
     "seed": 42, "weights": [1, 1], "merge": "mean", "alpha_unet": null, "alpha_te": null,
     "block_alpha": null, "block_p": null, "block_k": null, "vae": "base",
     "on_mismatch": "error", "allow_nonfinite": false,
     "epsilon": null, "beta": null, "rescale": "uniform",
     "hot_load": true, "dtype": "auto", "device": "auto",
     "save": false, "save_name": "my-merge", "save_dtype": "fp16", "overwrite": false,
     "task_id": null}

``epsilon`` (della, della_linear: keep probabilities 1-p-eps .. 1-p+eps by |delta| rank), ``beta``
(breadcrumbs, breadcrumbs_ties: largest fraction of |delta| dropped) and ``rescale`` ("uniform" or
"unbiased": 1/(1-p^j) for the TIES mean) are null/absent for the method's preset.

``task_id`` (optional, any string): the WebUI's ``/internal/progress`` then
reports the merge under that id, as it does for txt2img tasks.

LoRAs: ``base``/``models`` take "LoRA: name.safetensors" (a file of the WebUI's Lora folder) beside
checkpoint names; a LoRA's weight is its strength.  ``save_lora`` (a file name) writes the merge minus
the base as a kohya LoRA into the Lora folder, at ``lora_rank`` (default 32; ``lora_conv_rank`` for 3x3
convs, default the same); the answer's ``saved_lora`` gives its path, title, modules and worst
retained energy.

``POST /dare-merge/v1/analyze`` takes the same ``base``, ``models``, ``method`` and knob fields (plus
``device`` and ``task_id``) and answers the analysis JSON of ``lib_merge.analysis`` (issue 13): per block
the norm of each model's change, the cosine matrix, the sign conflict, and with a ``method`` the merge's
share/kept/elected agreement.  Without ``method`` it analyses the inputs alone.  The merge's answer carries
the same statistics, gathered during the merge, as ``"stats"`` (null when the merge gathered none).
``/cancel`` stops a running analysis too.

The merge waits for the WebUI's queue lock (so never runs during a
generation), merges are serialised, and errors come back as
``{"error": "<one line naming the file/key>", "type": "<ErrorClass>"}`` with
status 400 (409 when cancelled).
"""
import os
import time
import traceback

from ..errors import MergeCancelled, MergeError, OutputError, ParameterError
from ..recipe import MergeRecipe
from ..names import check_save_name
from ..writer import OUTPUT_TORCH_DTYPES
from . import host

PREFIX = "/dare-merge/v1"
RECIPE_FIELDS = ("method", "p", "k", "alpha", "lam", "vote_sgn", "seed", "weights", "merge", "alpha_unet",
                 "alpha_te", "block_alpha", "block_p", "block_k", "vae", "on_mismatch", "allow_nonfinite",
                 "epsilon", "beta", "rescale")
OPTION_FIELDS = ("base", "models", "hot_load", "dtype", "device", "save", "save_name", "save_dtype", "overwrite",
                 "task_id", "save_lora", "lora_rank", "lora_conv_rank")


def api_enabled() -> bool:
    from modules import shared
    opts = shared.cmd_opts
    return bool(getattr(opts, "api", False) or getattr(opts, "nowebui", False))


def auth_dependencies() -> list:
    """``[Depends(check)]`` when ``--api-auth`` is set, as the WebUI's own API does; else none."""
    from modules import shared
    spec = getattr(shared.cmd_opts, "api_auth", None)
    if not spec:
        return []
    from secrets import compare_digest

    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials
    credentials = {}
    for pair in spec.split(","):
        user, _, password = pair.strip().partition(":")
        credentials[user] = password

    def check(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> bool:
        expected = credentials.get(given.username)
        if expected is not None and compare_digest(given.password, expected):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return [Depends(check)]


def recipe_from_payload(payload: dict) -> MergeRecipe:
    """Build and validate a recipe from a JSON body (checkpoint names resolved in the WebUI's list)."""
    if not isinstance(payload, dict):
        raise ParameterError("the request body must be a JSON object")
    unknown = sorted(set(payload) - set(RECIPE_FIELDS) - set(OPTION_FIELDS))
    if unknown:
        raise ParameterError(f"unknown field(s): {', '.join(unknown)}")
    models = payload.get("models")
    if isinstance(models, str):
        models = [models]
    if not isinstance(models, list) or not models:
        raise ParameterError("'models' must be a non-empty list of checkpoint names")
    base = host.find_checkpoint(str(payload.get("base") or "")).filename
    paths = [host.find_checkpoint(str(m)).filename for m in models]
    kwargs = {k: payload[k] for k in RECIPE_FIELDS if k in payload and payload[k] is not None}
    kwargs.setdefault("method", "dare_ties")
    try:
        recipe = MergeRecipe(base=base, models=paths, **kwargs)
        recipe.validate()
    except MergeError:
        raise
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"bad parameter: {exc}") from exc
    return recipe


def _choice(value, choices, auto, what: str) -> str:
    value = "auto" if value in (None, "") else str(value)
    if value == "auto":
        return auto()
    if value not in choices:
        raise ParameterError(f"{what} must be one of auto, {', '.join(choices)}; got {value!r}")
    return value


def merge(payload: dict) -> dict:
    """The body of ``POST /merge``; raises MergeError subclasses for the user's mistakes."""
    from . import get_session
    session = get_session()
    recipe = recipe_from_payload(payload)
    hot_load = bool(payload.get("hot_load", True))
    save = bool(payload.get("save", False))
    lora_target, lora_ranks = _lora_request(payload, bool(payload.get("overwrite", False)))
    if not hot_load and not save and not lora_target:
        raise ParameterError("nothing to do: set hot_load, save and/or save_lora")
    dtype = _choice(payload.get("dtype"), ("fp16", "bf16", "fp32"), host.merge_precision, "dtype")
    device = _choice(payload.get("device"), ("cpu", "cuda"), host.merge_device, "device")
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ParameterError("CUDA is not available in this WebUI; use device cpu or auto")
        device = host.resolve_device("cuda", host.webui_device()).device   # the WebUI's own card: cuda:1 stays
    save_name = save_dtype = None
    overwrite = bool(payload.get("overwrite", False))
    if save:
        save_dtype = str(payload.get("save_dtype") or "fp16")
        if save_dtype not in OUTPUT_TORCH_DTYPES:
            raise ParameterError(f"save_dtype must be one of {', '.join(OUTPUT_TORCH_DTYPES)}")
        raw_name = str(payload.get("save_name") or "").strip()
        if not raw_name:
            raise ParameterError("save_name is required to save")
        save_name = check_save_name(raw_name, session.models_dir)   # before any merge: 400, not a late OSError
        target = os.path.join(session.models_dir, save_name)
        if os.path.exists(target) and not overwrite:
            raise OutputError("exists already; pass overwrite=true or choose another name", target)

    requested = time.time()
    from . import merge_or_reuse
    task_id = payload.get("task_id") or None
    with host.exclusive("DARE merge (API)", task_id=str(task_id) if task_id else None) as waited:
        started = time.time()
        result, reused = merge_or_reuse(recipe, dtype, device, hot_load, stats=True)
        saved = session.save(save_name, save_dtype, overwrite, recipe) if save else None
        saved_lora = _save_lora(recipe, lora_target, lora_ranks, device, overwrite) if lora_target else None
        finished = time.time()
    loader = session.hot_loader
    return {"name": result.name, "recipe_hash": result.recipe_hash, "hot_loaded": hot_load, "reused": reused,
            "saved": saved, "saved_lora": saved_lora,
            "saved_title": _title_of(saved), "summary": result.report.summary(), "notes": result.report.notes,
            "seconds": round(result.report.seconds, 3), "device": result.report.device, "dtype": dtype,
            "waited_s": round(waited, 3), "requested_at": requested, "started_at": started,
            "finished_at": finished, "loaded_model": loader.loaded_title(),
            "recipe": result.recipe.params_dict(), "stats": merge_stats(result)}


def merge_stats(result) -> dict | None:
    """The statistics the merge gathered while it ran (analysis-JSON shape), or None."""
    stats = getattr(getattr(result, "report", None), "stats", None)
    return stats if isinstance(stats, dict) else None


ANALYZE_OPTIONS = ("base", "models", "device", "task_id")
_analysis_token: dict = {"cancel": None}


def analyze(payload: dict) -> dict:
    """The body of ``POST /analyze``: the analysis JSON; MergeError subclasses for the user's mistakes."""
    if not isinstance(payload, dict):
        raise ParameterError("the request body must be a JSON object")
    unknown = sorted(set(payload) - set(RECIPE_FIELDS) - set(ANALYZE_OPTIONS))
    if unknown:
        raise ParameterError(f"unknown field(s) for analyze: {', '.join(unknown)}")
    with_method = payload.get("method") not in (None, "")
    recipe = recipe_from_payload(payload)
    device = _choice(payload.get("device"), ("cpu", "cuda"), host.merge_device, "device")
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ParameterError("CUDA is not available in this WebUI; use device cpu or auto")
        device = host.resolve_device("cuda", host.webui_device()).device
    from ..analysis import analyze as run_analyze
    from ..engine import CancelToken
    task_id = payload.get("task_id") or None
    token = CancelToken()
    with host.exclusive("DARE analysis (API)", task_id=str(task_id) if task_id else None):
        _analysis_token["cancel"] = token
        try:
            return run_analyze(recipe.base, list(recipe.models), recipe if with_method else None, device=device,
                               progress=lambda event: host.mirror_progress(event, token.cancel), cancel=token)
        finally:
            _analysis_token["cancel"] = None


def cancel_analysis() -> bool:
    token = _analysis_token["cancel"]
    if token is None:
        return False
    token.cancel()
    return True


def _lora_request(payload: dict, overwrite: bool) -> tuple[str | None, tuple[int, int | None]]:
    """``save_lora`` (a name in the WebUI's Lora folder) and its ranks, checked before any merge."""
    raw = str(payload.get("save_lora") or "").strip()
    ranks = []
    for field, default in (("lora_rank", 32), ("lora_conv_rank", None)):
        value = payload.get(field, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ParameterError(f"{field} must be a whole number of at least 1, got {value!r}")
        ranks.append(value)
    if not raw:
        if payload.get("lora_rank") is not None or payload.get("lora_conv_rank") is not None:
            raise ParameterError("lora_rank/lora_conv_rank need save_lora (the LoRA's file name)")
        return None, (ranks[0], ranks[1])
    folder = host.lora_dir()
    if not os.path.isdir(folder):
        os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, check_save_name(raw, folder))
    if os.path.exists(target) and not overwrite:
        raise OutputError("exists already; pass overwrite=true or choose another name", target)
    return target, (ranks[0], ranks[1])


def _save_lora(recipe: MergeRecipe, target: str, ranks: tuple[int, int | None], device: str, overwrite: bool
               ) -> dict:
    """Merge again in float32 and write the delta as a LoRA (lib_merge.lora.extract); the Lora list is refreshed."""
    from ..lora.extract import merge_to_lora
    _, extract = merge_to_lora(recipe, target, ranks[0], ranks[1], device=device, overwrite=overwrite,
                               lora_dtype="fp16", protected_paths=host.loaded_checkpoint_files())
    host.refresh_loras()
    name, energy = extract.worst
    return {"path": target, "title": host.LORA_MARK + os.path.relpath(target, host.lora_dir()).replace(os.sep, "/"),
            "modules": extract.modules, "rank": extract.rank, "conv_rank": extract.conv_rank,
            "worst_energy": round(energy, 6), "worst_module": name}


def _title_of(path: str | None) -> str | None:
    if not path:
        return None
    real = os.path.realpath(path)
    for info in host.checkpoint_infos():
        if os.path.realpath(info.filename) == real:
            return info.title
    return None


def restore() -> dict:
    from . import get_session
    session = get_session()
    with host.exclusive("DARE merge: restore"):
        name = session.restore()
    return {"restored": name, "loaded_model": session.hot_loader.loaded_title()}


def _error(exc: BaseException):
    from fastapi.responses import JSONResponse
    if isinstance(exc, MergeError):
        code = 409 if isinstance(exc, MergeCancelled) else 400
        return JSONResponse(status_code=code, content={"error": str(exc), "type": type(exc).__name__})
    traceback.print_exc()
    return JSONResponse(status_code=500, content={"error": f"unexpected error: {type(exc).__name__}: {exc}",
                                                  "type": type(exc).__name__})


def _guard(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # every failure becomes a JSON answer
        return _error(exc)


def register(app) -> None:
    """Add the routes to the WebUI's FastAPI app (``on_app_started``)."""
    if app is None:
        return
    if not api_enabled():
        print("[dare-merge] HTTP routes not added: start the WebUI with --api to get /dare-merge/v1/*")
        return
    from fastapi import Body
    from . import get_session, status
    from .hotload_base import FAULTS, test_hooks_enabled
    deps = auth_dependencies()
    existing = {getattr(r, "path", None) for r in getattr(app, "routes", [])}
    if f"{PREFIX}/merge" in existing:
        return

    def merge_route(payload: dict = Body(...)):
        return _guard(merge, payload)

    def status_route(fingerprint: bool = False):
        return _guard(status, fingerprint)

    def restore_route():
        return _guard(restore)

    def cancel_route():
        return {"cancelled": bool(get_session().cancel() | cancel_analysis())}

    def analyze_route(payload: dict = Body(...)):
        return _guard(analyze, payload)

    app.add_api_route(f"{PREFIX}/merge", merge_route, methods=["POST"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/status", status_route, methods=["GET"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/restore", restore_route, methods=["POST"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/cancel", cancel_route, methods=["POST"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/analyze", analyze_route, methods=["POST"], dependencies=deps)
    if test_hooks_enabled():
        def fault_route(payload: dict = Body(...)):
            return _guard(lambda: (FAULTS.arm(int(payload.get("after", 100))), {"armed": True})[1])

        app.add_api_route(f"{PREFIX}/test/fail-next-hot-load", fault_route, methods=["POST"], dependencies=deps)


__all__ = ["register", "merge", "analyze", "merge_stats", "restore", "recipe_from_payload", "auth_dependencies", "api_enabled", "PREFIX"]
