"""The live view streams Chromium's fake microphone (a voiced clip played in a loop) to the
service and shows each window's answer and the smoothed one; a correction stores that window,
and nothing else of the stream is stored."""
import time
from datetime import datetime, timezone

import pytest
from sqlalchemy import select

from storage.models import Clip, Feedback, Prediction
from tests.dashboard.conftest import expect, screenshot

pytestmark = pytest.mark.browser


def test_live_view_streams_the_microphone_and_shows_raw_and_smoothed_timelines(
        open_dashboard, server):
    """...and the window on show is corrected in one click, stored then and only then."""
    page = open_dashboard()
    page.goto("/#live")
    since = datetime.now(timezone.utc)
    started = time.monotonic()
    page.click("#live-toggle")
    page.locator("#live-result .result-emotion").wait_for(timeout=10_000)
    first_result_s = time.monotonic() - started
    # One window a second after the first three seconds, on both timelines.
    page.locator("#live-timeline .timeline.raw .segment").nth(2).wait_for(timeout=10_000)
    assert first_result_s < 6, f"the first result took {first_result_s:.1f} s"
    raw = page.locator("#live-timeline .timeline.raw .segment")
    smoothed = page.locator("#live-timeline .timeline.smoothed .segment")
    assert smoothed.count() == raw.count() >= 3
    assert all(smoothed.nth(i).get_attribute("data-label") for i in range(smoothed.count()))
    shares = [float(text.rstrip("%")) for text in
              page.locator("#live-stats .stat-value").all_inner_texts()]
    assert shares and abs(sum(shares) - 100) <= len(shares)
    assert "after the hop" in page.locator("#live-stats .stat-summary").inner_text()
    screenshot(page, "live")

    with server.db() as session:  # a stream stores nothing unless asked
        assert not session.scalars(select(Prediction).where(
            Prediction.created_at >= since)).all()
    shown = page.locator("#live-result .result-emotion").inner_text().lower()
    right = "happy" if shown != "happy" else "calm"
    page.click(f"#live-result .label-button[data-label={right}]")
    page.locator("#live-result .feedback-status.ok").wait_for()
    assert page.locator("#corrections-count").inner_text() == "1"
    with server.db() as session:
        stored = session.execute(
            select(Prediction.label, Feedback.label, Clip.duration_s)
            .join(Feedback, Feedback.prediction_id == Prediction.id)
            .join(Clip, Clip.id == Prediction.clip_id)
            .where(Prediction.created_at >= since)).all()
    assert len(stored) == 1
    assert stored[0][0] == shown and stored[0][1] == right
    assert stored[0][2] == pytest.approx(3.0)  # the window's own 3 s

    # An earlier window, picked on the timeline (then with the arrow keys), shows its own answer.
    first_id = page.get_attribute("#live-result .result", "data-prediction-id")
    raw.first.click()
    expect(page.locator("#live-timeline .pin-note")).to_contain_text("Showing the window at")
    assert page.get_attribute("#live-result .result", "data-prediction-id") != first_id
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.matches('#live-timeline button.segment')")
    expect(page.locator("#live-timeline .timeline.raw button.segment").nth(1)).to_have_attribute(
        "aria-pressed", "true")

    page.click("#live-toggle")
    assert page.get_attribute("#live-toggle", "aria-pressed") == "false"
    expect(page.locator("#live-state")).to_have_text("Stopped")
