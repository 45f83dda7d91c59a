"""``specbeam dashboard`` in a real browser: the command serves on a free loopback port, headless
Chromium (Selenium + the system chromedriver) runs one greedy speculative generation, and the page
shows accepted / corrected / bonus tokens in distinct colours whose token ids are, in order, the
target's own greedy output; it also lists and opens a saved run. A screenshot is saved to
``$SPECBEAM_ARTIFACTS`` (or the test's tmp folder).

Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian ``chromium chromium-driver``; ``.ci/run``
installs them) and the ``selenium`` package. Without them the test is skipped, except in CI
(``CI=true``), where it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import DEMO_DIR

PROMPT = "class Stack:\n    def __init__(self):\n"
MAX_NEW = 16
GAMMA = 3


pytestmark = pytest.mark.slow  # drives a browser: not in the quick tier (-m "not slow")


def _chromium() -> tuple[str | None, str | None]:
    browser = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and os.path.exists(p)), None)
    driver = next((p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver") or "") if p and os.path.exists(p)), None)
    return browser, driver


def _need(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: .ci/run must install it, so this fails instead of skipping)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = _chromium()
    _need(chromium is not None and chromedriver is not None,
          "headless Chromium not found: apt-get install chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _need(False, "selenium is not installed: pip install -e '.[test]'")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """``specbeam dashboard --port 0`` in a subprocess; yields its URL and its runs folder."""
    runs = tmp_path_factory.mktemp("runs")
    (runs / "eval_demo.json").write_text(json.dumps({
        "meta": {"command": "specbeam evaluate --demo"},
        "modes": [{"mode": "greedy", "label": "greedy", "tokens_per_s": 100.0},
                  {"mode": "speculative", "label": "speculative gamma=4", "tokens_per_s": 250.0}],
    }))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "specbeam_hf.app.cli", "dashboard", "--port", "0", "--runs-dir", str(runs)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    url, lines = None, []
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break  # exited
            lines.append(line)
            m = re.search(r"serving on (http://127\.0\.0\.1:\d+/)", line)
            if m:
                url = m.group(1)
                break
        assert url is not None, "dashboard did not start:\n" + "".join(lines[-20:])
        yield url, runs
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _greedy_reference() -> tuple[list[int], str]:
    tok = AutoTokenizer.from_pretrained(DEMO_DIR / "target")
    target = AutoModelForCausalLM.from_pretrained(DEMO_DIR / "target", dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]  # [1, P]
    out = target.generate(ids, max_new_tokens=MAX_NEW, do_sample=False)[0, ids.shape[1]:].tolist()  # stops at EOS
    return out, tok.decode(out, skip_special_tokens=True)


def test_dashboard_streams_coloured_iterations_equal_to_greedy(browser, dashboard, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, _ = dashboard
    assert url.startswith("http://127.0.0.1:")  # loopback by default
    browser.get(url)
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")

    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    browser.execute_script("arguments[0].value = arguments[1];", prompt, PROMPT)
    Select(browser.find_element(By.ID, "mode")).select_by_value("speculative-greedy")
    for field, value in (("gamma", GAMMA), ("max-new-tokens", MAX_NEW)):
        el = browser.find_element(By.ID, field)
        el.clear()
        el.send_keys(str(value))
    browser.find_element(By.ID, "run").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", \
        browser.find_element(By.ID, "status").text

    spans = browser.find_elements(By.CSS_SELECTOR, "#tokens span.tok")
    kinds = [next(c for c in s.get_attribute("class").split() if c != "tok") for s in spans]
    ids = [int(s.get_attribute("data-token-id")) for s in spans]
    ref_ids, ref_text = _greedy_reference()
    assert ids == ref_ids  # the page's tokens are the target's greedy output, in order
    assert browser.find_element(By.ID, "output-text").get_attribute("textContent") == ref_text
    assert "accepted" in kinds and ("bonus" in kinds or "recovered" in kinds)
    assert set(kinds) <= {"accepted", "recovered", "bonus"}

    # one row per iteration; each ends in one corrected or bonus token (the last may be cut by max_new_tokens)
    rows = browser.find_elements(By.CSS_SELECTOR, "#iterations tr.iteration")
    ends = kinds.count("recovered") + kinds.count("bonus")
    assert ends <= len(rows) <= ends + 1
    assert browser.find_element(By.ID, "stat-steps").text == str(len(rows))
    assert browser.find_element(By.ID, "stat-accepted").text == str(kinds.count("accepted"))

    colours = {}
    for kind in ("accepted", "recovered", "bonus"):
        els = browser.find_elements(By.CSS_SELECTOR, f".legend .{kind}")
        colours[kind] = els[0].value_of_css_property("background-color")
    assert len(set(colours.values())) == 3, colours  # distinct colours

    shots = Path(os.environ.get("SPECBEAM_ARTIFACTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the saved run is listed and opens as a table
    item = next(li for li in browser.find_elements(By.CSS_SELECTOR, "#runs li") if "eval_demo.json" in li.text)
    item.click()
    wait.until(lambda d: "speculative gamma=4" in d.find_element(By.ID, "run-view").text)
