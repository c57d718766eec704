"""The tab builds and serves under gradio 4.40.0 (Forge's), checked in the ``.venv-gradio4`` environment.

A subprocess with that venv's python builds the standalone app on an empty models folder, launches
it on 127.0.0.1 and fetches the page and its component config; every control the hover titles name
must be there.  Skips when that environment does not exist (see tests/ui/README.md to make it).
"""
from __future__ import annotations

import json
import subprocess

import pytest

from ui_support import GRADIO4_PYTHON, ROOT, free_port, gradio_version, subprocess_env

SCRIPT = r"""
import json, sys, urllib.request
from lib_merge.ui import compat
from lib_merge.ui.host import FolderHost
from lib_merge.ui.standalone import build_app
host = FolderHost(sys.argv[1])
app = build_app(host)
compat.launch(app, int(sys.argv[2]), block=False)
try:
    base = f"http://127.0.0.1:{sys.argv[2]}"
    page = urllib.request.urlopen(base + "/", timeout=30).read().decode()
    config = json.loads(urllib.request.urlopen(base + "/config", timeout=30).read())
finally:
    app.close()
ids = sorted({c.get("props", {}).get("elem_id") for c in config["components"]} - {None})
print(json.dumps({"gradio": compat.GRADIO_VERSION, "config_version": config.get("version"),
                  "page_ok": "<gradio-app" in page or "gradio_config" in page, "ids": ids}))
"""


def test_tab_builds_and_serves_under_gradio4(tmp_path):
    version = gradio_version(GRADIO4_PYTHON)
    if version is None or not version.startswith("4."):
        pytest.skip(f"no gradio 4 environment at {GRADIO4_PYTHON} (found gradio {version})")
    from lib_merge.ui.hints import load_titles
    models = tmp_path / "models"
    models.mkdir()
    out = subprocess.run([GRADIO4_PYTHON, "-c", SCRIPT, str(models), str(free_port())], cwd=ROOT,
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["gradio"] == version and report["page_ok"], report
    missing = sorted(set(load_titles()) - set(report["ids"]))
    assert not missing, f"controls missing from the gradio {version} page: {missing}"
