"""Helpers for the merge tab's tests: a real standalone server, a real Chromium page, artifacts.

The server runs in a subprocess exactly as a user starts it (``python -m lib_merge ui``), with the
python of the gradio version under test: the project venv (gradio 3.41.2, as in A1111) and, when it
exists, ``.venv-gradio4`` (gradio 4.40.0, as in Forge).  Chromium is Debian's (/usr/bin/chromium),
driven by Playwright's bundled driver; no browser is downloaded.

Skips (never silent passes) when gradio, Playwright or Chromium is missing; set
``DARE_MERGE_REQUIRE_BROWSER=1`` (CI) to turn those skips into failures.
"""
from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from typing import Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHROMIUM = os.environ.get("DARE_MERGE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
GRADIO4_PYTHON = os.environ.get("DARE_MERGE_GRADIO4_PYTHON", os.path.join(ROOT, ".venv-gradio4", "bin", "python"))
SERVER_START_TIMEOUT = 180.0


def missing(reason: str) -> None:
    """Skip, or fail when the environment promises everything is installed."""
    if os.environ.get("DARE_MERGE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (DARE_MERGE_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


def artifacts_dir() -> str:
    """$ARTIFACTS_DIR, else ./artifacts/ at the repository root (git-ignored)."""
    path = os.environ.get("ARTIFACTS_DIR") or os.path.join(ROOT, "artifacts")
    os.makedirs(path, exist_ok=True)
    return path


@functools.lru_cache(maxsize=None)
def gradio_version(python: str) -> str | None:
    """gradio's version in ``python``'s environment, or None when it has none."""
    if not os.path.exists(python):
        return None
    out = subprocess.run([python, "-c", "import gradio; print(gradio.__version__)"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    """Environment of the server and CLI subprocesses: this checkout importable, no telemetry.

    OMP_NUM_THREADS=1 unless set: both sides of the UI-vs-CLI comparison then run with the same
    thread count, and on a small machine shared with other jobs torch's OpenMP workers spinning made
    a 2-second merge of these tiny files take a minute.
    """
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@dataclass
class Server:
    url: str
    models_dir: str
    python: str
    gradio: str
    log_path: str

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()



@contextlib.contextmanager
def chromium() -> Iterator[object]:
    """Headless Debian Chromium through Playwright (its driver ships in the wheel; no download), or a skip."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install playwright; no `playwright install` needed)")
    if not os.path.exists(CHROMIUM):
        missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def standalone_server(python: str, models_dir: str, log_path: str, gradio: str = "") -> Iterator[Server]:
    """``python -m lib_merge ui --models-dir DIR --port P`` in a subprocess, until the page answers."""
    port = free_port()
    env = subprocess_env()
    env.setdefault("DARE_MERGE_CACHE", os.path.join(os.path.dirname(log_path), "hash-cache"))
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([python, "-m", "lib_merge", "ui", "--models-dir", models_dir, "--port", str(port)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(url, models_dir, python, gradio, log_path)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the standalone server exited with {proc.returncode}:\n{server.log()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the standalone server did not answer within {SERVER_START_TIMEOUT:.0f} s:\n"
                            f"{server.log()}")
            time.sleep(0.5)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


class TabPage:
    """The merge tab in a browser page, driven by elem_id like a user would (clicks and typing)."""

    def __init__(self, page) -> None:
        self.page = page

    def open(self, url: str) -> "TabPage":
        self.page.goto(url)
        self.page.wait_for_selector("#dare_merge_run", timeout=60_000)
        return self

    def pick(self, elem: str, value: str) -> None:
        """Choose ``value`` in a (multi)select dropdown: type to filter, click the option."""
        field = self.page.locator(f"#{elem} input").first
        field.click()
        field.fill(value)
        # gradio 3 marks options with data-value, gradio 4 with aria-label
        option = self.page.locator(f'#{elem} ul li[data-value="{value}"], #{elem} ul li[aria-label="{value}"]')
        option.first.click(timeout=15_000)
        self.page.locator("#dare_merge_method_help").first.click()  # close the list (click on plain text)
        # the choice shows (the single value in the box, or a chip of a multiselect) before the next step:
        # on a loaded machine a click that follows at once could reach the server before the choice did
        self.page.wait_for_function(
            """([elem, value]) => {
                const root = document.querySelector('#' + elem);
                if (!root) return false;
                const box = root.querySelector('input');
                if (box && box.value === value) return true;
                return [...root.querySelectorAll('.token, .token span, [class*=token]')]
                    .some(t => t.textContent.trim() === value);
            }""", arg=[elem, value], timeout=15_000)

    def set_number(self, elem: str, value: str) -> None:
        """Type into a slider's number box (or a Number field) and commit it."""
        box = self.page.locator(f"#{elem} input[type=number]").first
        box.fill(value)
        box.press("Enter")
        self.page.locator("#dare_merge_method_help").first.click()

    def type_text(self, elem: str, value: str) -> None:
        box = self.page.locator(f"#{elem} textarea, #{elem} input").first
        box.fill(value)
        box.press("Tab")

    def number(self, elem: str) -> str:
        return self.page.input_value(f"#{elem} input[type=number]")

    def status(self) -> str:
        return self.page.input_value("#dare_merge_status textarea")

    def wait_number(self, elem: str, value: float, timeout: float = 20.0) -> None:
        """Wait until a number box shows ``value`` (events run asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            shown = self.number(elem)
            try:
                if abs(float(shown) - value) < 1e-9:
                    return
            except ValueError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"#{elem} shows {shown!r}, expected {value}")
            self.page.wait_for_timeout(100)

    def reset_status(self) -> None:
        """Clicking Cancel while idle says "nothing is running": a known status to wait away from."""
        self.page.locator("#dare_merge_cancel").click()
        self.wait_status("nothing is running")

    def click_and_wait(self, elem: str, *prefixes: str, timeout: float = 120.0) -> str:
        """Click a button and return the status it leads to (starting with a prefix, or 'error')."""
        self.reset_status()
        self.page.locator(f"#{elem}").click()
        return self.wait_status(*prefixes, timeout=timeout)

    def wait_status(self, *prefixes: str, timeout: float = 120.0) -> str:
        """Wait until the status starts with one of ``prefixes`` (or 'error'); return it."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.status()
            if text.startswith(prefixes + ("error",)):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"status never reached {prefixes}: {text!r}")
            self.page.wait_for_timeout(200)
