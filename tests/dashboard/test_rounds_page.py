"""Learning rounds on the models page: each round's gate report drawn, and a round started with
one click (refused while another holds the learner lock)."""
import pytest
from sqlalchemy import select

from learner.labels import DEFAULT_LABELS
from storage.models import Feedback
from storage.runs import LearnerLockRepository, RoundFeedbackRepository, TrainingRunRepository
from tests.dashboard.conftest import expect, screenshot

pytestmark = pytest.mark.browser


def rejected_report() -> dict:
    before = {label: 0.6 for label in DEFAULT_LABELS}
    after = {**before, "sad": 0.5, "happy": 0.65}
    return {"decision": "rejected",
            "reason": "sad lost 10.0 points of recall (at most 2.0 allowed)", "scope": "global",
            "user_id": None, "old_classes": list(DEFAULT_LABELS), "new_classes": [], "max_recall_drop": 0.02, "recall_before": before,
            "recall_after": after, "macro_f1_before": 0.6, "macro_f1_after": 0.59,
            "new_feedback_accuracy_before": 0.3, "new_feedback_accuracy_after": 0.6,
            "gate_set_size": 420, "new_holdout_size": 8}


def paired_report() -> dict:
    """A report of the paired gate: 'happy' fell further than 'sad' but by noise; 'sad' was
    refused by its test."""
    report = rejected_report()
    report["recall_after"] = {**report["recall_before"], "sad": 0.5, "happy": 0.45}
    report["paired"] = {label: {"refused": label == "sad", "detectable_loss": 0.08}
                        for label in DEFAULT_LABELS}
    report["paired"]["calm"]["detectable_loss"] = 0.18
    report["signal"] = {"n": 20, "agreements": 5, "expected_by_chance": 4.2, "p_value": 0.41,
                        "decidable": True, "refused": True}
    return {**report, "confidence": 0.95, "alpha": 0.05}


def test_rounds_show_their_gate_reports_and_start_in_one_click(open_dashboard, server):
    # A round that ran before, took every piece of feedback so far, and was rejected.
    with server.db() as session:
        runs = TrainingRunRepository(session)
        past = runs.start("schedule")
        feedback_ids = session.scalars(select(Feedback.id)).all()
        RoundFeedbackRepository(session).mark_consumed(past.id, trained=feedback_ids, held_out=[])
        runs.finish(past, "rejected", counts={"feedback": len(feedback_ids)},
                    gate_report=rejected_report())
        tested = runs.start("manual")
        runs.finish(tested, "rejected", counts={}, gate_report=paired_report())
        session.commit()

    page = open_dashboard()
    page.goto("/#models")
    item = page.locator(f"#runs li.run[data-run='{past.id}']")
    expect(item.locator(".badge").first).to_have_text("rejected")
    chart = item.locator("svg.gate-svg")
    expect(chart.locator("rect.bar-after")).to_have_count(len(DEFAULT_LABELS))
    # The class that fell past the allowed drop is the one marked.
    expect(chart.locator("rect.bar-dropped")).to_have_count(1)
    expect(chart.locator("text.value-dropped")).to_have_text("60% → 50%")
    # A paired gate's report: the class its test refused is marked, not the larger point drop.
    paired = page.locator(f"#runs li.run[data-run='{tested.id}']")
    marked = paired.locator("svg.gate-svg text.value-dropped")
    expect(marked).to_have_count(1)
    expect(marked).to_have_text("60% → 50%")
    expect(paired).to_contain_text("Smallest loss the gate set can show")
    expect(paired).to_contain_text("8.0% – 18.0%")
    expect(paired).to_contain_text("Held-out corrections it agrees with5 of 20 (4.2 by chance, "
                                   "p = 0.41)")
    screenshot(page.locator("#runs").locator(".."), "rounds")

    # While another round holds the lock, starting one is refused and the page says so.
    with server.db() as session:
        assert LearnerLockRepository(session).acquire("another-process", ttl_s=60)
    page.click("#start-round")
    expect(page.locator("#models-message")).to_have_text("A round is already running.")
    with server.db() as session:
        LearnerLockRepository(session).release("another-process")
        session.commit()

    # Free again: the round starts, and with no new feedback it ends skipped at once.
    page.click("#start-round")
    expect(page.locator("#models-message")).to_contain_text("started")
    newest = page.locator("#runs li.run").first
    expect(newest).to_have_attribute("data-status", "skipped", timeout=15_000)
    expect(page.locator("#models-message")).to_contain_text("finished: skipped")
    assert int(newest.get_attribute("data-run")) > past.id
    runs = server.get("/v1/admin/runs", key=server.admin_key).json()["runs"]
    assert runs[0]["status"] == "skipped"

