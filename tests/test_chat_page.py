"""The chat page at / in a real headless browser (Debian's Chromium through Selenium and chromedriver): a message
typed in, the reply's tokens streaming in, and Stop ending the generation on the server too."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.serve_live import live, tiny_app, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# As root in a container, with no network beyond loopback: no sandbox, no GPU, nothing fetched in the background.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,800"]


@pytest.fixture
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/test.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="leangpt-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_chat_page_streams_a_reply_and_stops_it(tiny_checkpoint, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    app = tiny_app(tiny_checkpoint, step_seconds=0.06)  # ~40 tokens take 2.5 s: time to watch them arrive
    with live(app) as url, httpx.Client(base_url=url, timeout=10) as api:
        browser.get(url + "/")
        wait_for(lambda: browser.find_element(By.ID, "model").text == "tiny", timeout=10)
        for field, value in (("max_tokens", "40"), ("seed", "7"), ("temperature", "0.9")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        browser.find_element(By.ID, "prompt").send_keys("Sing of the king", Keys.ENTER)
        assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "Sing of the king"

        def reply() -> str:
            return browser.find_element(By.CSS_SELECTOR, ".msg.assistant").text

        seen: list[str] = []
        deadline = time.monotonic() + 20
        while len(set(seen)) < 3 and time.monotonic() < deadline:  # three different lengths of the same reply
            text = reply()
            if text and (not seen or text != seen[-1]):
                seen.append(text)
            time.sleep(0.02)
        assert len(set(seen)) >= 3 and all(b.startswith(a) for a, b in zip(seen, seen[1:])), seen
        assert browser.find_element(By.ID, "status").text == "generating…"
        assert api.get("/health").json()["running_rows"] == 1

        browser.find_element(By.ID, "stop").click()
        wait_for(lambda: browser.find_element(By.ID, "status").text == "stopped", timeout=5)
        wait_for(lambda: api.get("/health").json()["running_rows"] == 0, timeout=3)  # the row left the batch
        stopped = reply()
        time.sleep(0.3)  # several steps' worth: nothing more arrives
        assert reply() == stopped and len(stopped) >= len(seen[-1])
        assert browser.find_element(By.ID, "send").is_enabled() and not browser.find_element(By.ID, "stop").is_enabled()
        # The conversation goes on: a second message gets a reply that runs to its end.
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("5")
        browser.find_element(By.ID, "prompt").send_keys("And the queen?", Keys.ENTER)
        wait_for(lambda: browser.find_element(By.ID, "status").text == "done", timeout=20)
        assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
