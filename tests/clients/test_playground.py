"""The web playground in headless Chromium (Debian's, driven by Playwright) on the session `server`:
send a message, watch the reply grow token by token, press Stop, and take a screenshot (into the test's
temporary folder; KVSERVE_PLAYGROUND_SCREENSHOT=bench/results/playground.png refreshes the repo's)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.server_process import REPO

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
SCREENSHOT_ENV = "KVSERVE_PLAYGROUND_SCREENSHOT"

sync_api = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no {CHROMIUM}: `apt-get install -y chromium chromium-driver` (make test does)",
                allow_module_level=True)


@pytest.fixture
def page():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        yield page
        browser.close()
        assert not errors, errors


def reply_length(page) -> int:
    return page.evaluate("document.querySelector('.message.assistant .content').textContent.length")


def test_chat_streams_tokens_and_stop_aborts(server, page, tmp_path):
    page.goto(server.url + "/")
    sync_api.expect(page.locator("#model")).to_have_text("model: smollm2", timeout=30_000)
    page.fill("#system", "You are a storyteller who writes very long stories.")
    page.fill("#max-tokens", "400")
    page.fill("#temperature", "0")  # greedy: the same long story every run
    page.fill("#prompt", "Tell me a long story about a lighthouse keeper and a storm.")
    page.click("#send")
    sync_api.expect(page.locator("#stop")).to_be_enabled()
    page.wait_for_function("document.querySelector('.message.assistant .content').textContent.length > 0",
                           timeout=120_000)
    first = reply_length(page)
    target = max(first + 1, 60)
    page.wait_for_function(f"document.querySelector('.message.assistant .content').textContent.length >= {target}",
                           timeout=120_000)
    assert reply_length(page) > first  # the text grows while the request is still open
    sync_api.expect(page.locator("#status")).to_have_text("streaming…")
    page.click("#stop")
    sync_api.expect(page.locator("#status")).to_have_text("stopped")
    sync_api.expect(page.locator("#send")).to_be_enabled()
    sync_api.expect(page.locator("#stop")).to_be_disabled()
    stopped_at = reply_length(page)
    assert page.locator("#ttft").inner_text().endswith(" ms")
    assert int(page.locator("#tokens").inner_text()) >= 2 and page.locator("#tps").inner_text().endswith("tok/s")
    screenshot = REPO / os.environ[SCREENSHOT_ENV] if SCREENSHOT_ENV in os.environ else tmp_path / "playground.png"
    page.screenshot(path=str(screenshot))
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    page.wait_for_timeout(500)
    assert reply_length(page) == stopped_at  # nothing arrives after Stop


def test_playground_shows_server_errors(server, page):
    page.goto(server.url + "/")
    page.fill("#max-tokens", "100000")  # beyond the model's context: the server answers 400
    page.fill("#prompt", "Hi")
    page.press("#prompt", "Enter")
    sync_api.expect(page.locator("#status")).to_have_text("error", timeout=60_000)
    sync_api.expect(page.locator(".message.error .content")).to_contain_text("400")

