"""/docs and /redoc in headless Chromium (Debian's, driven by Playwright) on the session `server`, with
every request to a host other than 127.0.0.1 aborted: both pages render the API from kvserve's own
assets, nothing tries to leave the machine, and /metrics counts the assets under their route."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
ASSET_ROUTE = "/static/docs/{name}"

sync_api = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no {CHROMIUM}: `apt-get install -y chromium chromium-driver` (make test does)",
                allow_module_level=True)


@pytest.fixture
def offline_page():
    """A page whose requests reach 127.0.0.1 only; the test fails if it tried any other host."""
    outside: list[str] = []

    def only_local(route):
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.route("**/*", only_local)
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        yield page
        browser.close()
    assert not outside, f"the page tried to load from outside: {outside}"
    assert not errors, errors


def request_counts(url: str) -> dict[str, float]:
    """kvserve_http_requests_total summed by route label."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "kvserve_http_requests_total":
                counts[sample.labels["route"]] = counts.get(sample.labels["route"], 0.0) + sample.value
    return counts


def open_swagger_ui(page, url: str) -> None:
    page.goto(url + "/docs")
    sync_api.expect(page.locator(".opblock").first).to_be_visible(timeout=30_000)


def open_redoc(page, url: str):
    page.goto(url + "/redoc")
    menu = page.locator(".menu-content")
    sync_api.expect(menu).to_contain_text("OpenAI-compatible", timeout=30_000)
    return menu


def test_swagger_ui_lists_the_operations(server, offline_page):
    open_swagger_ui(offline_page, server.url)
    paths = offline_page.eval_on_selector_all(".opblock .opblock-summary-path",
                                              "elements => elements.map(e => e.dataset.path)")
    assert {"/v1/chat/completions", "/v1/completions", "/generate", "/health"} <= set(paths), paths
    assert offline_page.locator(".info .title").inner_text().startswith("kvserve")


def test_redoc_renders_its_menu(server, offline_page):
    menu = open_redoc(offline_page, server.url)
    sync_api.expect(menu).to_contain_text("Chat completion")
    sync_api.expect(menu).to_contain_text("text-generation-inference")
    sync_api.expect(offline_page.locator("h1").first).to_contain_text("kvserve")


def test_metrics_count_the_assets_under_their_route(server, offline_page):
    before = request_counts(server.url)
    open_swagger_ui(offline_page, server.url)
    open_redoc(offline_page, server.url)
    after = request_counts(server.url)
    grown = {route: after[route] - before.get(route, 0.0) for route in after if after[route] != before.get(route)}
    assert grown.get(ASSET_ROUTE, 0) >= 3, grown  # Swagger UI's script and stylesheet, ReDoc's script
    assert grown.get("/docs") == grown.get("/redoc") == 1 and grown.get("/openapi.json") == 2, grown
    assert "unmatched" not in grown, grown
