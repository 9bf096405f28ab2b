"""The live view records from Chromium's fake microphone (a voiced clip played in a loop) and
sends overlapping windows while recording."""
import time
from datetime import datetime, timezone

import pytest
from sqlalchemy import select

from storage.models import Clip, Prediction
from tests.dashboard.conftest import expect, screenshot

pytestmark = pytest.mark.browser


def test_live_view_shows_results_from_the_microphone_within_seconds(open_dashboard, server):
    """...and the result on show is corrected in one click."""
    page = open_dashboard()
    page.goto("/#live")
    since = datetime.now(timezone.utc)
    started = time.monotonic()
    page.click("#live-toggle")
    page.locator("#live-result .result-emotion").wait_for(timeout=8_000)
    first_result_s = time.monotonic() - started
    # The first window goes out after 1 s, then one every second: 2, then 3 s long.
    page.locator("#live-timeline .segment").nth(2).wait_for(timeout=10_000)
    page.click("#live-toggle")
    assert page.get_attribute("#live-toggle", "aria-pressed") == "false"
    assert first_result_s < 5, f"the first result took {first_result_s:.1f} s"

    shown = page.locator("#live-result .result-emotion").inner_text().lower()
    prediction_id = page.get_attribute("#live-result .result", "data-prediction-id")
    assert server.get(f"/v1/predictions/{prediction_id}").json()["emotion"] == shown
    # Session statistics: shares of time that add up to the whole.
    shares = [float(text.rstrip("%")) for text in
              page.locator("#live-stats .stat-value").all_inner_texts()]
    assert shares and abs(sum(shares) - 100) <= len(shares)
    screenshot(page, "live")

    page.click("#live-result .label-button[data-label=happy]")
    page.locator("#live-result .feedback-status.ok").wait_for()
    assert page.locator("#corrections-count").inner_text() == "1"

    # An earlier window, picked on the timeline (then with the arrow keys), shows its own result.
    segments = page.locator("#live-timeline button.segment")
    first_id = page.get_attribute("#live-result .result", "data-prediction-id")
    segments.first.click()
    expect(page.locator("#live-timeline .pin-note")).to_contain_text("Showing the window at")
    assert page.get_attribute("#live-result .result", "data-prediction-id") != first_id
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.matches('#live-timeline button.segment')")
    expect(segments.nth(1)).to_have_attribute("aria-pressed", "true")

    # What the service received: overlapping windows growing to about 3 s, about 1 s apart.
    with server.db() as session:
        durations = session.scalars(
            select(Clip.duration_s).join(Prediction, Prediction.clip_id == Clip.id)
            .where(Prediction.created_at >= since).order_by(Prediction.created_at)
        ).all()
    assert len(durations) >= 3
    assert durations[0] == pytest.approx(1.0, abs=0.2)
    assert durations[1] == pytest.approx(2.0, abs=0.2)
    assert all(d == pytest.approx(3.0, abs=0.2) for d in durations[2:])

