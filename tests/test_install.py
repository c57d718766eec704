"""`pip install .` gives the library and a working `dare-merge` command, usable from any folder.

A fresh virtual environment sees the dev venv's packages through a .pth file
(torch is never downloaded), and the project is installed from a copy of this
checkout with --no-deps --no-build-isolation, as a WebUI user with torch
already installed would.  The copy keeps build/ and *.egg-info out of the
checkout.
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_IN_COPY = shutil.ignore_patterns(".venv*", ".git", ".hypothesis", "__pycache__", "models", "artifacts",
                                      "build", "*.egg-info", "*.safetensors", "*.part")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    work = tmp_path_factory.mktemp("install")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=SKIP_IN_COPY)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
    with open(os.path.join(purelib, "dev-venv.pth"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(site.getsitepackages()) + "\n")
    python = str(venv / "bin" / "python")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
                           "--no-build-isolation", "--no-index", "--disable-pip-version-check", "-q", str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"venv": venv, "python": python, "purelib": purelib, "bin": venv / "bin" / "dare-merge"}


def run_elsewhere(args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DARE_MERGE_DEBUG")}
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_pip_install_packages_only_lib_merge_with_its_data(installed):
    top = sorted(os.listdir(installed["purelib"]))
    assert "lib_merge" in top
    for name in ("scripts", "tests", "benchmarks", "javascript", "install.py"):
        assert name not in top
    for arch in ("sd1", "sd2", "sdxl"):
        assert os.path.isfile(os.path.join(installed["purelib"], "lib_merge", "arch_data", f"{arch}.json.gz"))
    for sub in ("ui", "webui"):
        assert os.path.isfile(os.path.join(installed["purelib"], "lib_merge", sub, "__init__.py"))


def test_dare_merge_command_works_from_another_folder(installed, sd1_set, tmp_path):
    where = run_elsewhere([installed["python"], "-c", "import lib_merge; print(lib_merge.__file__)"], tmp_path)
    assert where.stdout.strip().startswith(installed["purelib"]), where.stdout + where.stderr
    help_ = run_elsewhere([str(installed["bin"]), "--help"], tmp_path)
    assert help_.returncode == 0 and help_.stdout.startswith("usage: dare-merge"), help_.stderr
    shown = run_elsewhere([str(installed["bin"]), "inspect", sd1_set["base"]], tmp_path)
    assert shown.returncode == 0 and "SD1.x" in shown.stdout, shown.stderr
    bad = run_elsewhere([str(installed["bin"]), "inspect", str(tmp_path / "missing.safetensors")], tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "missing.safetensors" in bad.stderr


def test_dare_merge_merges_like_python_dash_m(installed, sd1_set, tmp_path):
    out = tmp_path / "merged.safetensors"
    proc = run_elsewhere([str(installed["bin"]), "merge", "--base", sd1_set["base"], "--models",
                          sd1_set["models"][0], "--method", "weighted_sum", "--device", "cpu", "--quiet",
                          "--out", str(out)], tmp_path)
    assert proc.returncode == 0 and out.is_file(), proc.stderr
