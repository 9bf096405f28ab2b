"""The models page: versions with their gate reports drawn, rollback in one click after a
confirmation, and what the service serves afterwards."""
import time

import pytest

from learner.labels import DEFAULT_LABELS
from service.bench.clips import to_wav, voiced_clip
from storage.registry import ModelRegistry
from storage.repositories import AuditLog
from tests.dashboard.conftest import expect, screenshot

pytestmark = pytest.mark.browser


def gate_report(labels) -> dict:
    """A gate report as the learner writes it (see the shared contract)."""
    before = {label: 0.5 + 0.04 * i for i, label in enumerate(labels)}
    return {"decision": "accepted", "reason": "no old class lost more than 2 points of recall",
            "scope": "global", "user_id": None, "old_classes": list(labels), "new_classes": [],
            "max_recall_drop": 0.02, "recall_before": before,
            "recall_after": {label: value + 0.01 for label, value in before.items()},
            "macro_f1_before": 0.55, "macro_f1_after": 0.58,
            "new_feedback_accuracy_before": 0.4, "new_feedback_accuracy_after": 0.7,
            "gate_set_size": 420, "new_holdout_size": 12}


def test_roll_back_from_the_models_page(open_dashboard, server, random_model):
    # A learning round's result: version 2, with its gate report, made active.
    with server.db() as session:
        registry = ModelRegistry(session, server.artifacts)
        v2 = registry.register(random_model, labels=list(DEFAULT_LABELS), parent_version=1,
                               metrics={"gate": {"macro_f1": 0.58, "n": 420}},
                               gate_report=gate_report(DEFAULT_LABELS))
        session.commit()
        registry.activate(v2.version, reason="round 1 passed the gate")
        session.commit()
    wait_until_served(server, v2.version)

    page = open_dashboard()
    page.goto("/#models")
    v1_card = page.locator("article.version[data-version='1']")
    v2_card = page.locator(f"article.version[data-version='{v2.version}']")
    expect(v2_card.locator(".version-status")).to_have_text("active")
    # The gate report as a picture: a before and an after bar for each class.
    chart = v2_card.locator("svg.gate-svg")
    expect(chart.locator("rect.bar-before")).to_have_count(len(DEFAULT_LABELS))
    expect(chart.locator("rect.bar-after")).to_have_count(len(DEFAULT_LABELS))
    assert "55.0% → 58.0%" in v2_card.inner_text()  # macro-F1 before and after

    rollback = v1_card.get_by_role("button", name="Roll back to v1")
    rollback.click()  # first: change one's mind
    page.locator("#confirm-dialog").wait_for()
    page.click("#confirm-cancel")
    expect(page.locator("#models-message")).to_have_text("Nothing changed.")
    assert active_version(server) == v2.version

    rollback.click()
    page.fill("#confirm-reason", "v2 hears calm as sad")
    page.click("#confirm-ok")
    expect(v1_card.locator(".version-status")).to_have_text("active")
    expect(v2_card.locator(".version-status")).to_have_text("retired")
    expect(page.locator("#serving-text")).to_have_text("serving v1")
    expect(page.locator("#audit .audit-entry").first).to_contain_text("v2 hears calm as sad")
    screenshot(page, "models")

    # The service serves version 1 again, and the audit log says who did it and why.
    assert active_version(server) == 1
    assert server.predict(to_wav(voiced_clip(1.0), 16_000))["model_version"] == 1
    with server.db() as session:
        entry = AuditLog(session).list_recent(limit=1)[0]
    assert entry.action == "model.activate" and entry.details["reason"] == "v2 hears calm as sad"
    assert entry.actor_key_id is not None  # the admin key the page used


def test_models_page_without_an_admin_key_is_read_only(open_dashboard):
    page = open_dashboard(admin=False)
    page.goto("/#models")
    expect(page.locator("article.version[data-version='1']")).to_be_visible()
    expect(page.locator("#models-message")).to_contain_text("Read-only")
    assert page.locator("article.version button").count() == 0
    expect(page.locator("#start-round")).to_be_disabled()
    expect(page.locator("#audit")).to_have_text("Needs an admin key.")


def active_version(server) -> int:
    models = server.get("/v1/models").json()
    return next(m["version"] for m in models if m["status"] == "active")


def wait_until_served(server, version: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while server.get("/ready").json().get("model_version") != version:
        assert time.monotonic() < deadline, f"version {version} was never served"
        time.sleep(0.1)
