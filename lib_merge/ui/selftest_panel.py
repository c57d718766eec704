"""The self-test in the tab's "Advanced" section: one button, and the report to paste into a bug report.

The same checks as ``python -m lib_merge selftest`` (:mod:`lib_merge.selftest`)
on the device the tab's Device dropdown shows, so a user of either host
(standalone, A1111, Forge) can run them without a terminal.  It runs through
``host.run_exclusive`` (a WebUI's queue lock: a generation waits for it, and
it waits for a generation) on a thread, and the report box shows which
check is running until the report replaces it.
"""
from __future__ import annotations

import threading
from typing import Any, Iterator

from .compat import gr
from .host import TabHost
from .texts import error_text

POLL_SECONDS = 0.5
ARCHES = ("sd1", "sdxl")


def selftest_texts(host: TabHost, device: str | None, arch: str,
                   poll_seconds: float = POLL_SECONDS) -> Iterator[str]:
    """Run the self-test on a thread; yield a progress line while it runs, then the report (or the error)."""
    from ..selftest import format_report, run_selftest
    state: dict[str, Any] = {"line": f"self-test on {device or 'auto'} ({arch}): starting"}

    def progress(step: int, total: int, name: str) -> None:
        state["line"] = f"self-test on {device or 'auto'} ({arch}): check {step} of {total}, {name}"

    def runner() -> None:
        try:
            state["report"] = host.run_exclusive(lambda: run_selftest(device or "auto", arch, progress))
        except BaseException as exc:  # shown in the report box
            state["error"] = exc

    thread = threading.Thread(target=runner, name="dare-merge-selftest", daemon=True)
    thread.start()
    last = None
    while thread.is_alive():
        if state["line"] != last:
            last = state["line"]
            yield last
        thread.join(poll_seconds)
    if "error" in state:
        yield error_text(state["error"])
    else:
        yield format_report(state["report"])


def build_selftest(host: TabHost, device) -> None:
    """The self-test controls, inside the caller's layout; ``device`` is the tab's Device dropdown."""
    with gr.Row():
        arch = gr.Radio(list(ARCHES), value=ARCHES[0], label="Self-test architecture",
                        elem_id="dare_merge_selftest_arch")
        run = gr.Button("Run the self-test", elem_id="dare_merge_selftest_run")
    report = gr.Textbox(value="", label="Self-test report (a few minutes; paste it into a bug report)", lines=4,
                        max_lines=40, interactive=False, elem_id="dare_merge_selftest_report")

    def on_run(device_v, arch_v):
        yield from selftest_texts(host, device_v, arch_v)

    run.click(on_run, inputs=[device, arch], outputs=[report])


__all__ = ["build_selftest", "selftest_texts"]
