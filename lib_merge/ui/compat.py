"""Gradio 3.41 (A1111) vs 4.40 (Forge): the few API differences, in one place.

The tab is written against the subset both versions share; whatever differs
(the ``_js``/``js`` keyword, queue and launch arguments, how a multiselect's
value must relate to its choices) goes through these helpers so the rest of
the UI never checks a version.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

# No telemetry or update checks from a server that must work offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402  (after the environment is set)

GRADIO_VERSION: str = getattr(gr, "__version__", "0")
GRADIO_MAJOR: int = int(GRADIO_VERSION.split(".")[0] or 0)


def js_kwargs(js: str | None) -> dict[str, Any]:
    """Keyword for client-side JS on an event: ``_js`` in gradio 3, ``js`` in gradio 4."""
    if js is None:
        return {}
    return {"_js": js} if GRADIO_MAJOR < 4 else {"js": js}


def update(**kwargs: Any) -> Any:
    """``gr.update`` (both versions have it; gradio 4 also accepts new component instances)."""
    return gr.update(**kwargs)


def keep_known(value: Any, choices: Iterable[str], multiselect: bool) -> Any:
    """A dropdown value restricted to ``choices``.

    Gradio 4 refuses a value that is not among the choices; gradio 3 shows it
    anyway.  After a refresh (a file deleted or renamed) both should simply
    drop what is gone.
    """
    known = set(choices)
    if multiselect:
        return [v for v in (value or []) if v in known]
    return value if value in known else None


def dropdown_update(choices: list[str], value: Any, multiselect: bool = False) -> Any:
    """New choices for a dropdown, keeping the still-valid part of its value."""
    return gr.update(choices=list(choices), value=keep_known(value, choices, multiselect))


def blocks(**kwargs: Any) -> gr.Blocks:
    """``gr.Blocks`` with only the keywords this gradio version knows."""
    kwargs.setdefault("analytics_enabled", False)
    if GRADIO_MAJOR < 4:
        for key in ("head", "js", "fill_height", "delete_cache"):
            kwargs.pop(key, None)
    return gr.Blocks(**kwargs)


def queue(app: gr.Blocks, concurrency: int = 2) -> gr.Blocks:
    """Enable the queue (generators need it) without exposing the API page.

    ``concurrency`` lets the Cancel button and status reads run while a merge
    streams its progress; merges themselves are serialised by the session lock.
    """
    if GRADIO_MAJOR < 4:
        return app.queue(concurrency_count=concurrency, api_open=False)
    return app.queue(default_concurrency_limit=concurrency, api_open=False)


def launch(app: gr.Blocks, port: int, block: bool = True) -> None:
    """Serve on 127.0.0.1 only, no share link, no browser, no API docs."""
    kwargs: dict[str, Any] = dict(server_name="127.0.0.1", server_port=port, share=False,
                                  inbrowser=False, show_api=False, prevent_thread_lock=not block,
                                  quiet=False)
    if GRADIO_MAJOR < 4:
        kwargs["show_error"] = False
    app.launch(**kwargs)


def load_js(app: gr.Blocks, js: str) -> None:
    """Run ``js`` (a function expression) in the browser when the page loads."""
    app.load(None, None, None, **js_kwargs(js))
