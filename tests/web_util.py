"""Test helper for the chat page (tests/test_web.py): headless Chromium from Debian's packages driven by
Selenium through Debian's chromedriver (both named by path, so Selenium never downloads a browser), an
app on a free loopback port in a thread, and the page's controls as functions."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hf_util import LLAMA, REPO

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT_S = 60                 # the longest any step of a page test waits for the page (bounded, never forever)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-dev-shm-usage", "--window-size=1100,760"]


def browser_missing() -> str | None:
    """Why the page tests cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]' (or make test-browser)"
    absent = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.isfile(p)]
    if absent:
        return (f"{' and '.join(absent)} absent: make test-browser installs Debian's chromium and "
                "chromium-driver (apt-get install -y chromium chromium-driver)")
    return None


def start_chromium(profile: Path):
    """A headless Chromium with a fresh profile directory; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    return driver


def wait(driver, condition, what: str, timeout: float = WAIT_S):
    """condition(driver) once truthy (polled every 50 ms, `timeout` s at most)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)
    except TimeoutException:
        raise AssertionError(f"the page did not {what} within {timeout} s") from None


def open_page(driver, url: str, model: str | None) -> None:
    """Load the page; with a model name, wait until the page shows it (it asked GET /v1/models)."""
    driver.get(url + "/")
    if model is not None:
        wait(driver, lambda d: d.find_element("id", "model").text == model, f"show the model {model!r}")


def settings(driver, **fields) -> None:
    """Fill the settings column: mode, system, temperature, max_tokens, seed (None: leave empty)."""
    from selenium.webdriver.support.ui import Select
    for name, value in fields.items():
        el = driver.find_element("id", name.replace("_", "-"))
        if name == "mode":
            Select(el).select_by_value(value)
        else:
            text = "" if value is None else str(value)
            driver.execute_script("arguments[0].value = arguments[1]", el, text)


def send(driver, text: str) -> None:
    """Type a message (set as the textarea's value: it may hold newlines) and press Send."""
    driver.execute_script("arguments[0].value = arguments[1]", driver.find_element("id", "input"), text)
    driver.find_element("id", "send").click()


def last_reply(driver) -> dict:
    """The last turn of the log once it is over: its text, class, finish reason and figures line."""
    turn = wait(driver, lambda d: d.find_elements("css selector", "#log .turn:last-child[data-finish]"),
                "finish the reply")[0]
    return driver.execute_script(
        "const t = arguments[0]; return {text: t.querySelector('.text').textContent, "
        "finish: t.dataset.finish, classes: t.className, stats: t.querySelector('.stats').textContent, "
        "elements: t.querySelector('.text').children.length};", turn)


def screenshot(driver, name: str) -> Path:
    """Save a PNG of the page under test-artifacts/ (ignored by git) and return its path."""
    out = Path(REPO) / "test-artifacts"
    out.mkdir(exist_ok=True)
    path = out / name
    assert driver.save_screenshot(str(path)), "the screenshot was not written"
    return path


@contextmanager
def cli_server(*extra: str) -> Iterator[tuple[str, str]]:
    """`python -m tinyinfer.serve` on the demo model at a free loopback port: (its address, the line
    announcing it); terminated (killed if it lingers) on the way out."""
    proc = subprocess.Popen([sys.executable, "-m", "tinyinfer.serve", "--ckpt", LLAMA, "--port", "0",
                             "--device", "cpu", "--dtype", "float32", "--max-kv-tokens", "2048", *extra],
                            stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO})
    try:
        timer = threading.Timer(60, proc.kill)      # bounded: never wait forever for the line
        timer.start()
        try:
            found = next(((m.group(1), line) for line in proc.stderr
                          if (m := re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line))), None)
        finally:
            timer.cancel()
        assert found, f"the server exited without announcing itself (code {proc.wait(10)})"
        yield found
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        proc.stderr.close()
