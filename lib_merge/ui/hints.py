"""The tab's hover titles, read from ``javascript/dare_merge_hints.js``.

In a WebUI that file is injected by the host and applied from ``onUiUpdate``;
the standalone server has neither, so it injects the same file behind a small
shim.  Keeping the titles in the JS file only (a JSON map between markers)
means one list for both hosts.
"""
from __future__ import annotations

import json
import os
import re

HINTS_JS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "javascript", "dare_merge_hints.js")
_MAP = re.compile(r"/\* BEGIN TITLES \*/(.*?)/\* END TITLES \*/", re.S)

# What A1111 provides and the standalone page lacks: gradioApp() and onUiUpdate(callback).
_SHIM = """
if (typeof window.gradioApp !== "function") {
    window.gradioApp = function () {
        const app = document.querySelector("gradio-app");
        return app && app.shadowRoot ? app.shadowRoot : document;
    };
}
if (typeof window.onUiUpdate !== "function") {
    const callbacks = [];
    window.onUiUpdate = function (cb) { callbacks.push(cb); };
    const run = function () { callbacks.forEach(function (cb) { try { cb(); } catch (e) { console.error(e); } }); };
    new MutationObserver(run).observe(document.body, {childList: true, subtree: true});
    setTimeout(run, 0);
}
"""


def read_hints_js() -> str:
    """The hints file's source ('' when the file is not shipped next to lib_merge)."""
    try:
        with open(HINTS_JS, encoding="utf-8") as handle:
            return handle.read()
    except OSError:
        return ""


def load_titles() -> dict[str, str]:
    """elem_id -> one-line tooltip."""
    match = _MAP.search(read_hints_js())
    return json.loads(match.group(1)) if match else {}


def standalone_script() -> str:
    """A function expression for ``Blocks.load(js=...)`` that installs the titles outside a WebUI."""
    body = read_hints_js()
    return "() => {\n" + _SHIM + "\n" + body + "\n}" if body else "() => {}"
