"""``python -m lib_merge ui``: the merge tab without a WebUI, on 127.0.0.1.

Merge, save and inspect over the checkpoints of one folder (no hot-load:
there is no running model).  The page is the same tab a WebUI renders, with
the WebUI's stylesheet and hover titles injected by hand since no WebUI does it.
"""
from __future__ import annotations

import importlib
import os
import sys
import time

from ..errors import MergeError
from .host import FolderHost

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STYLE_CSS = os.path.join(ROOT, "style.css")


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError:
        return ""


def build_app(host: FolderHost):
    """The standalone page: the tab rendered in a Blocks with the CSS and titles a WebUI would add."""
    from . import compat
    from .hints import standalone_script
    from .tab import build_tab

    tab = build_tab(host)
    with compat.blocks(title="DARE Merge", css=_read(STYLE_CSS)) as app:
        compat.gr.Markdown(f"## DARE Merge\nCheckpoints in `{host.models_dir}` — merges are saved there.",
                           elem_id="dare_merge_title")
        tab.render()
        compat.load_js(app, standalone_script())
    compat.queue(app)
    return app


def serve(models_dir: str, port: int = 7870, demo: bool = False) -> int:
    """Serve the tab on 127.0.0.1:``port`` until interrupted; returns the exit code."""
    models_dir = os.path.abspath(models_dir)
    if not os.path.isdir(models_dir):
        if not demo:
            raise MergeError("is not a folder (create it, or pass --demo to fill it with demo checkpoints)",
                             models_dir)
        os.makedirs(models_dir, exist_ok=True)
    host = FolderHost(models_dir)
    if demo and not host.list_checkpoints():
        from ..synth import write_demo_set
        print(f"--demo: {models_dir} has no checkpoints; writing small synthetic SD1 ones "
              "(not real models, for trying the tab out):", flush=True)
        for path in write_demo_set(models_dir):
            print(f"  {path}", flush=True)
        host.refresh()
    try:
        importlib.import_module("gradio")   # a deliberate availability check: one clear line, not a traceback
    except ImportError:
        raise MergeError("the standalone UI needs gradio: pip install gradio==3.41.2 (or 4.40.0)") from None
    from . import compat
    app = build_app(host)
    print(f"DARE Merge UI (gradio {compat.GRADIO_VERSION}) for {len(host.list_checkpoints())} checkpoints "
          f"in {models_dir}", flush=True)
    try:
        compat.launch(app, port, block=False)
    except OSError:
        raise MergeError(f"cannot serve on 127.0.0.1:{port}: the port is in use (choose another with --port)") \
            from None
    print(f"serving on http://127.0.0.1:{port}/ (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        app.close()
    return 0
