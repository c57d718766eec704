"""Helpers for the real-WebUI tests: a real A1111 (WEBUI_ROOT) or Forge (FORGE_ROOT), headless on CPU.

Nothing runs unless one of those variables points at an installed WebUI
(with its ``venv/``, or ``WEBUI_PYTHON`` / ``FORGE_PYTHON`` naming the
interpreter).  The WebUI gets a throw-away ``--data-dir`` whose
``extensions/sd-webui-dare-merge`` is a symlink to this checkout, and a
``--ckpt-dir`` holding links to three full-size synthetic SD1 checkpoints
(a base and two fine-tunes of it; the WebUI builds the real model, so they
cannot be scaled down).  Those take minutes to write, so they are kept in
``$DARE_MERGE_WEBUI_DATA`` (default ``<tmp>/dare-merge-webui-data``) for the
next run; ``DARE_MERGE_WEBUI_KEEP_DATA=0`` deletes them afterwards.  The
WebUI's own folders are not touched; the data dir (with saved merges) and
the server go when the tests end.

A1111 needs its CLIP tokenizer offline: set ``HF_HOME`` to a hub cache that
has ``openai/clip-vit-large-patch14`` (its vocab.json, merges.txt, special-token
files and CLIPConfig config.json are enough: the text model is built from the
config, its weights come from the checkpoint).
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import zlib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXT_NAME = "sd-webui-dare-merge"
AUTH = ("dm-test", "s3cret-pass")
FILES = {"base": "dm_base.safetensors", "ft1": "dm_ft1.safetensors", "ft2": "dm_ft2.safetensors"}

COMMON_FLAGS = ["--skip-prepare-environment", "--skip-install", "--skip-version-check", "--skip-torch-cuda-test",
                "--no-download-sd-model", "--api", "--nowebui", "--server-name", "127.0.0.1"]
HOST_FLAGS = {
    "a1111": ["--use-cpu", "all", "--no-half", "--precision", "full"],
    "forge": ["--always-cpu", "--all-in-fp32"],
}


def hosts() -> list:
    out = []
    for kind, var in (("a1111", "WEBUI_ROOT"), ("forge", "FORGE_ROOT")):
        root = os.environ.get(var)
        out.append(pytest.param((kind, root), id=kind,
                                marks=pytest.mark.skipif(not root, reason=f"{var} is not set")))
    return out


def data_dir() -> str:
    return os.environ.get("DARE_MERGE_WEBUI_DATA") or os.path.join(tempfile.gettempdir(), "dare-merge-webui-data")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebUI:
    """A started WebUI process and a tiny JSON client for it (HTTP basic auth on every call)."""

    def __init__(self, kind: str, root: str, work: str, ckpts: dict[str, str], extra_flags: tuple = (),
                 ui: bool = False) -> None:
        self.kind, self.root, self.work, self.ckpts = kind, root, work, ckpts
        self.extra_flags, self.ui = list(extra_flags), ui
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(work, "webui.log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 900) -> None:
        var = "WEBUI_PYTHON" if self.kind == "a1111" else "FORGE_PYTHON"
        python = os.environ.get(var) or os.path.join(self.root, "venv", "bin", "python")
        common = [f for f in COMMON_FLAGS if not (self.ui and f == "--nowebui")]
        cmd = [python, "launch.py", *common, *HOST_FLAGS[self.kind], "--port", str(self.port),
               "--data-dir", self.work, "--ckpt-dir", os.path.join(self.work, "ckpt"),
               "--ckpt", self.ckpts["base"], "--api-auth", ":".join(AUTH), *self.extra_flags]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
                   DO_NOT_TRACK="1", PYTHONUNBUFFERED="1", DARE_MERGE_TEST_HOOKS="1",
                   DARE_MERGE_CACHE=os.path.join(self.work, "hash-cache"))
        env.pop("COMMANDLINE_ARGS", None)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the WebUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                code, body = self.request("GET", "/dare-merge/v1/status", timeout=10)
            except (OSError, urllib.error.URLError):
                time.sleep(2)
                continue
            if code == 200:
                return
            if code != 404:  # 404: the UI is up, the API routes come a few seconds later
                raise RuntimeError(f"/dare-merge/v1/status answered {code} {body}:\n{self.log_tail()}")
            time.sleep(2)
        raise RuntimeError(f"the WebUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                return "\n".join(handle.read().decode("utf-8", "replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # -- HTTP
    def request(self, method: str, path: str, body=None, auth=True, timeout: float = 3600):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if auth:
            token = base64.b64encode(":".join(AUTH).encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                return err.code, json.loads(raw)
            except ValueError:
                return err.code, {"raw": raw.decode("utf-8", "replace")}

    def get(self, path: str, timeout: float = 3600, auth: bool = True):
        status, body = self.request("GET", path, auth=auth, timeout=timeout)
        if status >= 500:
            raise AssertionError(f"GET {path} -> {status} {body}\n{self.log_tail()}")
        return status, body

    def ok(self, method: str, path: str, body=None, timeout: float = 3600):
        status, answer = self.request(method, path, body, timeout=timeout)
        assert status == 200, f"{method} {path} -> {status} {answer}\n{self.log_tail(30)}"
        return answer

    def txt2img(self, seed: int = 1, steps: int = 2, prompt: str = "a photo of a cat") -> tuple[bytes, str]:
        """One 64x64 image: (raw pixel bytes, infotext)."""
        answer = self.ok("POST", "/sdapi/v1/txt2img", {
            "prompt": prompt, "negative_prompt": "", "width": 64, "height": 64, "steps": steps,
            "sampler_name": "Euler", "seed": seed, "cfg_scale": 7, "batch_size": 1, "n_iter": 1})
        info = json.loads(answer["info"])
        return png_pixels(base64.b64decode(answer["images"][0])), info["infotexts"][0]

    def fingerprint(self) -> str:
        return self.ok("GET", "/dare-merge/v1/status?fingerprint=true")["fingerprint"]


def png_pixels(png: bytes) -> bytes:
    """The decompressed image data of a PNG (text chunks such as the infotext left out)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    while pos < len(png):
        length = int.from_bytes(png[pos:pos + 4], "big")
        kind = png[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += png[pos + 8:pos + 8 + length]
        pos += 12 + length
    return zlib.decompress(idat)


def write_lora(path: str, rank: int = 4, scale: float = 0.5) -> str:
    """A small kohya-format LoRA for SD1 (diffusers-style layer names, which A1111 and Forge both map)."""
    import torch
    from safetensors.torch import save_file
    layers = {  # name: (out, in, conv kernel or None)
        "lora_unet_down_blocks_0_attentions_0_proj_in": (320, 320, 1),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q": (1280, 1280, None),
        "lora_unet_up_blocks_3_attentions_2_proj_out": (320, 320, 1),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768, None),
        "lora_te_text_model_encoder_layers_11_mlp_fc2": (768, 3072, None),
    }
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    for name, (out_dim, in_dim, kernel) in layers.items():
        down = torch.randn(rank, in_dim, generator=gen) * scale / in_dim ** 0.5
        up = torch.randn(out_dim, rank, generator=gen) * scale
        if kernel:
            down, up = down[:, :, None, None], up[:, :, None, None]
        tensors[f"{name}.lora_down.weight"] = down.half().contiguous()
        tensors[f"{name}.lora_up.weight"] = up.half().contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(rank)).half()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(tensors, path, metadata={"ss_network_module": "networks.lora"})
    return path


@contextlib.contextmanager
def serve(kind: str, root: str, checkpoints: dict[str, str], work: str, extra_flags: tuple = (), ui: bool = False,
          config: dict | None = None):
    """Start a WebUI on a fresh data dir holding the extension, the checkpoints, a test LoRA and,
    optionally, settings in its config.json (read before the model loads)."""
    os.makedirs(os.path.join(work, "extensions"))
    if config:
        with open(os.path.join(work, "config.json"), "w") as handle:
            json.dump(config, handle)
    os.symlink(REPO, os.path.join(work, "extensions", EXT_NAME))
    ckpt_dir = os.path.join(work, "ckpt")
    os.makedirs(ckpt_dir)
    ckpts = {}
    for key, path in checkpoints.items():
        link = os.path.join(ckpt_dir, os.path.basename(path))
        os.symlink(path, link)
        ckpts[key] = link
    write_lora(os.path.join(work, "models", "Lora", "dm_lora.safetensors"))
    server = WebUI(kind, root, work, ckpts, extra_flags, ui)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        suffix = "-ui" if ui else ("-" + "-".join(f.strip("-") for f in extra_flags) if extra_flags else "")
        suffix = "".join(c if c.isalnum() or c in "-_." else "_" for c in suffix)   # a flag may be a path
        keep = os.path.join(os.environ.get("ARTIFACTS_DIR") or tempfile.gettempdir(),
                            f"dare-merge-webui-{kind}{suffix}.log")
        shutil.copyfile(server.log_path, keep)
        shutil.rmtree(work, ignore_errors=True)
