"""The documentation routes in the real app, in-process and without a model (the app's start-up, which
loads one, does not run): every page and asset answers with its content type, the pages name nothing
outside kvserve, an API key leaves them public, and /metrics counts them by route template."""
from __future__ import annotations

import re

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from service.api.app import create_app
from service.api.docs import ASSET_TYPES, ASSETS_URL
from service.settings import Settings

PAGES = {"/docs": "text/html", "/redoc": "text/html", "/docs/oauth2-redirect": "text/html",
         "/openapi.json": "application/json"}
ASSETS = {f"{ASSETS_URL}/{name}": media_type for name, media_type in ASSET_TYPES.items()}
# A word that only the real file holds: the package's Swagger UI and ReDoc builds, not an error page.
MARKERS = {"swagger-ui-bundle.js": b"SwaggerUIBundle", "swagger-ui.css": b".swagger-ui",
           "redoc.standalone.js": b"Redoc", "favicon.png": b"\x89PNG"}


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(create_app(Settings(api_key=["docs-test-key"])))


@pytest.mark.parametrize("path", list(PAGES) + list(ASSETS))
def test_each_page_and_asset_answers_with_its_content_type(client, path):
    response = client.get(path)
    assert response.status_code == 200, response.text[:200]
    assert response.headers["content-type"].split(";")[0] == {**PAGES, **ASSETS}[path].split(";")[0]
    name = path.rsplit("/", 1)[1]
    if name in MARKERS:
        assert MARKERS[name] in response.content


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_pages_load_only_kvserve_assets(client, page):
    html = client.get(page).text
    assert "://" not in html  # no CDN, no web fonts
    urls = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert urls and all(url in ASSETS for url in urls), urls


def test_redoc_may_not_fetch_redoclys_logo(client):
    # The one outside URL inside ReDoc's script: the browser is told to load images from kvserve only.
    assert client.get("/redoc").headers["content-security-policy"] == "img-src 'self' data:"


def test_an_api_key_leaves_the_docs_public(client):
    assert client.get("/v1/models").status_code == 401  # the key is enforced...
    for path in list(PAGES) + list(ASSETS):
        assert client.get(path).status_code == 200, path  # ...but not on the documentation


def test_unknown_asset_names_are_404(client):
    for name in ("index.html", "swagger-ui.css.map", "..%2Fcore.py"):
        assert client.get(f"{ASSETS_URL}/{name}").status_code == 404, name


def test_metrics_count_the_docs_by_route_template():
    client = TestClient(create_app(Settings()))
    for path in list(PAGES) + list(ASSETS):
        client.get(path)
    families = text_string_to_metric_families(client.get("/metrics").text)
    counts = {sample.labels["route"]: sample.value for family in families for sample in family.samples
              if sample.name == "kvserve_http_requests_total"}
    assert counts == {**{path: 1.0 for path in PAGES}, f"{ASSETS_URL}/{{name}}": float(len(ASSETS))}
