"""A real X/Y/Z plot over merge parameters in a real WebUI (A1111 with WEBUI_ROOT, Forge with FORGE_ROOT).

The extension is installed into a throw-away ``--data-dir`` (the WebUI's own
folder is not touched), the WebUI runs headless on CPU with a synthetic
full-size SD1 base and one fine-tune, and the built-in "x/y/z plot" script
is driven over the API:

1. X = [DARE] p over 3 values, Y = [DARE] alpha over 2: 6 images whose
   infotexts carry their own p and alpha, and exactly 6 merges by the
   extension's own counter (``GET /dare-merge/v1/status``).
2. The same with Z = Seed over 2 values: 12 images, still 6 merges (one per
   distinct recipe, never one per seed) and the same recipe hash for both seeds.
3. After each grid the model that was loaded before it is back (the default
   setting); with "keep the last merge" the last cell's merge stays.
4. An out-of-range axis value is refused before any merge, naming the value.

Environment: ``WEBUI_ROOT`` / ``FORGE_ROOT`` (an installed WebUI with its
``venv``), ``HF_HOME`` for A1111's offline CLIP tokenizer (see
tests/webui/webui_support.py), optional ``DARE_WEBUI_TEST_MODELS`` (a folder
where the 2.1 GB synthetic checkpoints are kept between runs) and
``DARE_XYZ_TEST_PORT`` (default 7875).  Only one WebUI should run at a time on
a small machine.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOSTS = [(kind, os.environ.get(var)) for kind, var in (("a1111", "WEBUI_ROOT"), ("forge", "FORGE_ROOT"))]
HOSTS = [(kind, root) for kind, root in HOSTS if root]
pytestmark = pytest.mark.skipif(not HOSTS, reason="set WEBUI_ROOT (A1111) and/or FORGE_ROOT (Forge) to run")

COMMON_FLAGS = ["--skip-prepare-environment", "--skip-install", "--skip-version-check", "--skip-torch-cuda-test",
                "--no-download-sd-model", "--api", "--nowebui", "--server-name", "127.0.0.1"]
HOST_FLAGS = {"a1111": ["--use-cpu", "all", "--no-half", "--precision", "full"],
              "forge": ["--always-cpu", "--all-in-fp32"]}
START_TIMEOUT = 600
P_VALUES = [0.2, 0.4, 0.6]
ALPHA_VALUES = [0.5, 1.0]


# ----------------------------------------------------------------------------- HTTP

def call(base_url: str, path: str, body: dict | None = None, timeout: float = 1800) -> tuple[int, dict | str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base_url + path, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as err:
        raw, status = err.read().decode(errors="replace"), err.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def ok(base_url: str, path: str, body: dict | None = None) -> dict:
    status, answer = call(base_url, path, body)
    assert status == 200, f"{path}: HTTP {status}: {str(answer)[:2000]}"
    return answer


# ----------------------------------------------------------------------------- the server

def _models(tmp_path_factory) -> dict:
    """Base + 1 fine-tune, full-size SD1 fp16 (the WebUI builds the real SD1 model around them).

    One fine-tune keeps each CPU merge (13 of them) and the memory small; the
    axes and the cache do not depend on the number of models."""
    sys.path.insert(0, REPO)
    from lib_merge.synth import write_synthetic
    folder = os.environ.get("DARE_WEBUI_TEST_MODELS") or str(tmp_path_factory.mktemp("xyz-models"))
    os.makedirs(folder, exist_ok=True)
    names = {"base": ("xyzbase.safetensors", "base", 0), "ft1": ("xyzft1.safetensors", "finetune", 1)}
    out = {}
    for role, (name, kind, seed) in names.items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            write_synthetic(path, "sd1", kind, seed=seed, base_seed=0, dtype="fp16", scale_down=1,
                            delta_scale=0.05)
        out[role] = path
    out["dir"] = folder
    return out


def _wait_up(base_url: str, proc: subprocess.Popen, log_path: str) -> None:
    deadline = time.time() + START_TIMEOUT
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the WebUI exited ({proc.returncode}); log: {log_path}")
        try:
            status, answer = call(base_url, "/sdapi/v1/sd-models", timeout=5)
            if status == 200 and answer:
                return
        except OSError:
            pass
        time.sleep(2)
    raise RuntimeError(f"the WebUI did not come up in {START_TIMEOUT} s; log: {log_path}")


@pytest.fixture(scope="module", params=HOSTS, ids=[kind for kind, _ in HOSTS])
def webui(request, tmp_path_factory):
    kind, root = request.param
    models = _models(tmp_path_factory)
    data = tmp_path_factory.mktemp(f"xyz-{kind}-data")
    os.makedirs(data / "extensions")
    os.symlink(REPO, data / "extensions" / "sd-webui-dare-merge")
    hashes = tmp_path_factory.mktemp("xyz-hash-cache")
    port = int(os.environ.get("DARE_XYZ_TEST_PORT", "7875"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               DO_NOT_TRACK="1", PYTHONUNBUFFERED="1", DARE_MERGE_CACHE=str(hashes))
    env.pop("PYTHONPATH", None)
    command = [os.path.join(root, "venv", "bin", "python"), "launch.py", *COMMON_FLAGS, *HOST_FLAGS[kind],
               "--port", str(port), "--data-dir", str(data), "--ckpt-dir", models["dir"], "--ckpt", models["base"]]
    log_path = str(data / "webui.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(base_url, proc, log_path)
        yield {"url": base_url, "kind": kind, "models": models, "log": log_path}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# ----------------------------------------------------------------------------- helpers

def axis_indices(base_url: str) -> tuple[dict[str, int], list[str]]:
    """Index of each axis label in txt2img's X type dropdown, as the API's x/y/z plot reads it."""
    infos = ok(base_url, "/sdapi/v1/script-info")
    xyz = next(s for s in infos if s["name"] == "x/y/z plot" and not s["is_img2img"])
    choices = [c[0] if isinstance(c, (list, tuple)) else c for c in xyz["args"][0]["choices"]]
    return {label: i for i, label in enumerate(choices)}, choices


def titles(base_url: str, models: dict) -> dict[str, str]:
    by_file = {os.path.basename(m["filename"]): m["title"] for m in ok(base_url, "/sdapi/v1/sd-models")}
    return {role: by_file[os.path.basename(models[role])] for role in ("base", "ft1")}


def section_args(t: dict[str, str]) -> list:
    # enabled, use_tab, base, models, method, p, k, alpha, lam, vote_sgn, seed, weights, split_alpha, a_unet, a_te
    return [True, False, t["base"], [t["ft1"]], "add_difference", 0.5, 1.0, 1.0, 1.0, False, 42, "", False,
            1.0, 1.0]


def xyz_request(idx: dict, t: dict, x: tuple[str, str], y: tuple[str, str] | None = None,
                z: tuple[str, str] | None = None) -> dict:
    def axis(spec):
        return [0, "", []] if spec is None else [idx[spec[0]], spec[1], []]
    script_args = [*axis(x), *axis(y), *axis(z),
                   True, True, False, False, False, False, False, 0, False]
    # draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, vary x/y/z, margin, csv_mode
    return {"prompt": "a photo of a cat", "negative_prompt": "", "steps": 2, "sampler_name": "Euler",
            "width": 64, "height": 64, "cfg_scale": 7, "seed": 1, "batch_size": 1, "n_iter": 1,
            "script_name": "x/y/z plot", "script_args": script_args,
            "alwayson_scripts": {"DARE Merge": {"args": section_args(t)}}}


def infotext_params(text: str) -> dict[str, str]:
    last = text.strip().splitlines()[-1]
    out = {}
    for key, value in re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', last):
        value = value.strip()
        out[key] = json.loads(value) if value.startswith('"') else value
    return out


def merges(base_url: str) -> int:
    return ok(base_url, "/dare-merge/v1/status")["merges_performed"]


def cell_infotexts(answer: dict, n_cells: int) -> list[dict[str, str]]:
    info = json.loads(answer["info"])
    texts = info["infotexts"]
    assert len(answer["images"]) == len(texts) == n_cells + 1, (len(answer["images"]), len(texts))
    return [infotext_params(t) for t in texts[1:]]   # [0] is the grid


# ----------------------------------------------------------------------------- the test

def test_xyz_plot_merges_once_per_recipe(webui):
    url, models = webui["url"], webui["models"]
    idx, choices = axis_indices(url)
    labels = ["[DARE] p", "[DARE] k", "[DARE] alpha", "[DARE] lambda", "[DARE] vote_sgn", "[DARE] seed",
              "[DARE] method", "[DARE] alpha UNet", "[DARE] alpha TE"]
    for label in labels:
        assert choices.count(label) == 1, f"{label} missing or registered twice in the API's x/y/z plot"
    t = titles(url, models)
    # fp16 merges and a 1 GB input cache keep a CPU WebUI (fp32 model) within a small machine's RAM
    ok(url, "/sdapi/v1/options", {"dare_merge_precision": "fp16", "dare_merge_cache_mb": 1024})
    ok(url, "/sdapi/v1/txt2img", {"prompt": "warm-up", "steps": 1, "width": 64, "height": 64})  # loads the model
    original = ok(url, "/dare-merge/v1/status")["loaded_model"]
    assert original and original.startswith("xyzbase"), original

    # 1. X = p (3), Y = alpha (2): 6 images, 6 merges
    before = merges(url)
    answer = ok(url, "/sdapi/v1/txt2img", xyz_request(idx, t, ("[DARE] p", "0.2-0.6 (+0.2)"),
                                                      ("[DARE] alpha", "0.5, 1.0")))
    cells = cell_infotexts(answer, 6)
    assert merges(url) - before == 6
    pairs = [(float(c["DARE p"]), float(c["DARE alpha"])) for c in cells]
    assert sorted(pairs) == sorted(itertools.product(P_VALUES, ALPHA_VALUES))
    assert all(c["DARE p"] in ("0.2", "0.4", "0.6") for c in cells), "axis values drifted"
    hashes = {pair: c["DARE hash"] for pair, c in zip(pairs, cells)}
    assert len(set(hashes.values())) == 6
    for c in cells:
        assert c["DARE method"] == "add_difference" and c["DARE models"] == "xyzft1"
        assert c["Model hash"] == c["DARE hash"], "the infotext's model is not the cell's merge"
    xyz = ok(url, "/dare-merge/v1/xyz")
    assert xyz["last_grid"]["merges"] == 6 and xyz["cache"]["hits"] > 0
    status = ok(url, "/dare-merge/v1/status")
    assert status["loaded_model"] == original and not status["hot_loaded"], "the model before the grid is not back"

    # 2. the same grid with seeds on Z: 12 images, still one merge per recipe
    before = merges(url)
    answer = ok(url, "/sdapi/v1/txt2img", xyz_request(idx, t, ("[DARE] p", "0.2, 0.4, 0.6"),
                                                      ("[DARE] alpha", "0.5-1.0 [2]"), ("Seed", "1, 2")))
    cells = cell_infotexts(answer, 12)
    assert merges(url) - before == 6, "a seed axis caused extra merges"
    seen: dict[tuple[float, float], set] = {}
    for c in cells:
        pair = (float(c["DARE p"]), float(c["DARE alpha"]))
        seen.setdefault(pair, set()).add(c["Seed"])
        assert c["DARE hash"] == hashes[pair], "same recipe, different merge"
    assert all(s == {"1", "2"} for s in seen.values()) and len(seen) == 6

    # 3. an out-of-range value is refused before the grid starts, naming it
    before = merges(url)
    status, answer = call(url, "/sdapi/v1/txt2img", xyz_request(idx, t, ("[DARE] p", "0.5, 1.2")))
    refusal = " ".join(str(answer.get(field, "")) for field in ("errors", "message", "detail", "error"))
    assert status != 200 and '"1.2"' in refusal and "p (DARE drop rate)" in refusal, answer
    assert merges(url) == before

    # 4. "keep the last merge": the last cell's merge stays loaded after the grid
    ok(url, "/sdapi/v1/options", {"dare_merge_xyz_after_grid": "keep the last merge"})
    try:
        answer = ok(url, "/sdapi/v1/txt2img", xyz_request(idx, t, ("[DARE] p", "0.4"), ("[DARE] alpha", "1")))
        (cell,) = cell_infotexts(answer, 1)
        status = ok(url, "/dare-merge/v1/status")
        assert status["hot_loaded"] and status["loaded_recipe_hash"] == cell["DARE hash"] == hashes[(0.4, 1.0)]
    finally:
        ok(url, "/sdapi/v1/options", {"dare_merge_xyz_after_grid": "restore what was loaded before the grid"})
