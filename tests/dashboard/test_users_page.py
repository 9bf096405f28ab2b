"""A user's personal model: predictions the page makes for them say so, and the users view shows
the personal version, what it was built on, and its gate report."""
import pytest
from sqlalchemy import select
from torch import nn

from learner.checkpoint import model_from_bytes
from learner.labels import DEFAULT_LABELS
from learner.personal.model import personal_head_bytes
from storage.models import Feedback
from storage.registry import ModelRegistry
from tests.dashboard.conftest import expect, screenshot

pytestmark = pytest.mark.browser


def personal_gate_report(user: str) -> dict:
    before = {label: 0.5 for label in ("neutral", "happy", "sad", "angry")}
    return {"decision": "accepted", "reason": "better on alice's held-out corrections",
            "scope": "user", "user_id": user, "old_classes": list(before), "new_classes": [],
            "max_recall_drop": 0.02, "recall_before": before,
            "recall_after": {label: 0.75 for label in before}, "macro_f1_before": 0.5,
            "macro_f1_after": 0.74, "new_feedback_accuracy_before": 0.4,
            "new_feedback_accuracy_after": 0.8, "gate_set_size": 420, "new_holdout_size": 6}


def register_personal_version(server, user: str) -> tuple[int, int]:
    """A personal version for `user` on the active global version, as a personal round would
    leave it: a head on that version's embedding. Returns (personal, global) version numbers."""
    with server.db() as session:
        registry = ModelRegistry(session, server.artifacts)
        parent = registry.active_global()
        model = model_from_bytes(server.artifacts.read_model(parent.artifact_path, parent.sha256))
        head = nn.Linear(model.net.head.in_features, len(DEFAULT_LABELS))
        data = personal_head_bytes(head, DEFAULT_LABELS, parent_version=parent.version,
                                   parent_sha256=parent.sha256, parent_kind=model.kind)
        mine = registry.register(data, labels=list(DEFAULT_LABELS), parent_version=parent.version,
                                 scope="user", user_id=user, gate_report=personal_gate_report(user))
        session.commit()
        registry.activate(mine.version, reason="personal round passed the gate")
        session.commit()
        return mine.version, parent.version


def test_a_users_personal_model_in_results_and_in_the_users_view(open_dashboard, server,
                                                                 speech_file):
    personal, parent = register_personal_version(server, "alice")
    page = open_dashboard()
    page.click("#open-keys")  # the speaker: sent with predictions and corrections
    page.fill("#speaker-id", "alice")
    page.click("#keys-save")

    page.goto("/#upload")
    page.set_input_files("#upload-input", str(speech_file))
    meta = page.locator("#upload-result .result-meta")
    expect(meta.locator(".badge-personal")).to_have_text("personal model")
    expect(meta).to_contain_text(f"model v{personal}")
    page.click("#upload-result .label-button[data-label=angry]")
    page.locator("#upload-result .feedback-status.ok").wait_for()
    with server.db() as session:
        stored = session.scalars(select(Feedback).order_by(Feedback.id.desc())).first()
    assert (stored.label, stored.user_id) == ("angry", "alice")

    page.goto("/#users")
    expect(page.locator("#user-lookup")).to_have_value("alice")
    page.click("#user-form button[type=submit]")
    card = page.locator("#user-result .personal")
    expect(card).to_have_attribute("data-personal", "true")
    expect(card).to_have_attribute("data-status", "active")
    expect(card).to_contain_text(f"personal version {personal}, built on global version {parent}")
    expect(card).to_contain_text("Corrections: 1 of 20")
    version = page.locator(f"#user-result li.run[data-version='{personal}']")
    expect(version.locator("svg.gate-svg rect.bar-after")).to_have_count(4)
    screenshot(page, "users")

    # Someone without corrections (an admin key sees every user): the global model answers.
    page.fill("#user-lookup", "bob")
    page.click("#user-form button[type=submit]")
    expect(card).to_have_attribute("data-personal", "false")
    expect(card).to_contain_text("bob is answered by the global model")
    expect(card).to_contain_text("Corrections: 0 of 20")
