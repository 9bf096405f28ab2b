"""The dashboard's files as the service serves them (the browser tests in tests/dashboard drive
the page itself): no key needed to load the page, nothing fetched from anywhere else, and every
file shipped in the installed package."""
import re
from fnmatch import fnmatch
from pathlib import Path

import pytest

from service.dashboard import STATIC_DIR

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_page_and_its_modules_are_served_without_a_key(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    scripts = re.findall(r'src="(/dashboard/[^"]+\.js)"', page.text)
    assert scripts == ["/dashboard/js/main.js"]
    module = client.get(scripts[0])
    assert module.status_code == 200
    assert "javascript" in module.headers["content-type"]
    # Every module main.js imports is there too.
    for name in re.findall(r'from "\./([\w-]+\.js)"', module.text):
        assert client.get(f"/dashboard/js/{name}").status_code == 200, name
    missing = client.get("/dashboard/nothing.js")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


def test_the_page_is_not_part_of_the_api_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/dashboard") for p in paths)


def test_nothing_is_fetched_from_another_origin():
    for path in STATIC_DIR.rglob("*"):
        if path.is_file():
            urls = re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", path.read_text())
            assert all(url.endswith("w3.org/2000/svg") for url in urls), (path.name, urls)


def test_every_dashboard_file_is_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["service.dashboard"]
    package_dir = STATIC_DIR.parent
    for path in STATIC_DIR.rglob("*"):
        if path.is_file():
            relative = path.relative_to(package_dir).as_posix()
            assert any(fnmatch(relative, p) and relative.count("/") == p.count("/")
                       for p in patterns), f"{relative} would be missing from an installed package"
