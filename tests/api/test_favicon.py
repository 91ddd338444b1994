"""The playground's icon in the real app, in-process and without a model (the app's start-up, which loads
one, does not run): the page links it, it is an SVG image, /favicon.ico answers it too, and an API key
leaves it public, as the page itself is."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest
from starlette.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(create_app(Settings(api_key=["favicon-test-key"])))


def test_the_playground_links_an_svg_icon_that_is_served(client):
    page = client.get("/")
    assert page.status_code == 200
    link = re.search(r'<link rel="icon" href="([^"]+)" type="image/svg\+xml">', page.text)
    assert link, "no <link rel=icon> in the playground page"
    icon = client.get(link.group(1))
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert ET.fromstring(icon.content).tag == "{http://www.w3.org/2000/svg}svg"


def test_favicon_ico_answers_the_same_icon_without_a_key(client):
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200, icon.text
    assert icon.headers["content-type"].startswith("image/svg+xml")
    assert icon.content == client.get("/static/favicon.svg").content
    assert client.get("/v1/models").status_code == 401  # the key is required elsewhere
