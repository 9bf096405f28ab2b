"""The Recordings view: a long file uploaded, its job followed, its emotion over time drawn with
the segments, and a segment corrected in one click."""
import re
import uuid

import numpy as np
import pytest
from sqlalchemy import select

from service.bench.clips import to_wav, voiced_clip
from storage.models import Feedback, Prediction
from tests.dashboard.conftest import expect, screenshot

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def call_file(tmp_path_factory):
    wave = np.concatenate([voiced_clip(14.0, 16_000, seed=1), np.zeros(6 * 16_000, np.float32),
                           voiced_clip(16.0, 16_000, seed=2)])  # 36 s, past the clip limit
    path = tmp_path_factory.mktemp("recordings") / "call.wav"
    path.write_bytes(to_wav(wave, 16_000))
    return path


def test_a_recording_is_drawn_over_time_and_a_segment_corrected_in_one_click(
        open_dashboard, server, call_file):
    page = open_dashboard()
    page.goto("/#recordings")
    page.set_input_files("#recording-input", str(call_file))
    result = page.locator("#recording-result")
    expect(result).to_be_visible()
    expect(page.locator("#recording-status-text")).to_have_text("call.wav: done.")
    recording_id = result.get_attribute("data-recording-id")
    stored = server.get(f"/v1/recordings/{recording_id}").json()
    segments = stored["segments"]

    # The plot: one band part per segment, one strip part per window, the pause among them.
    assert page.locator("#recording-plot .plot-segment").count() == len(segments)
    assert page.locator("#recording-plot .plot-window").count() == len(stored["windows"])
    emotions = [page.locator("#recording-plot .plot-segment").nth(i).get_attribute("data-emotion")
                for i in range(len(segments))]
    assert emotions == [s["emotion"] for s in segments] and "silence" in emotions
    assert page.locator("#recording-legend li[data-label=silence]").count() == 1
    assert "00:36.0" in page.locator("#recording-meta").inner_text()
    rows = page.locator("#recording-segments .recording-segment")
    assert rows.count() == len(segments)

    # Clicking a segment in the plot selects its row; one click on a label corrects it.
    speech = next(i for i, s in enumerate(segments) if s["emotion"] != "silence")
    page.locator("#recording-plot .plot-segment").nth(speech).click()
    expect(rows.nth(speech)).to_have_class(re.compile("selected"))
    right = "angry" if segments[speech]["emotion"] != "angry" else "calm"
    rows.nth(speech).locator(f".label-button[data-label={right}]").click()
    expect(rows.nth(speech).locator(".feedback-status.ok")).to_contain_text(f"Received: {right}")
    assert rows.nth(speech).locator(f".label-button[data-label={right}]").get_attribute(
        "aria-pressed") == "true"
    silence = emotions.index("silence")
    assert rows.nth(silence).locator(".label-button").count() == 0  # nothing to correct
    screenshot(page, "recordings")

    with server.db() as session:
        row = session.execute(select(Prediction.label, Feedback.label).join(
            Feedback, Feedback.prediction_id == Prediction.id).order_by(Feedback.id.desc())
        ).first()
    assert row == (segments[speech]["emotion"], right)
    after = server.get(f"/v1/recordings/{recording_id}").json()["segments"][speech]
    assert uuid.UUID(after["prediction_id"])


def test_a_file_that_is_not_audio_says_why(open_dashboard, tmp_path):
    page = open_dashboard()
    page.goto("/#recordings")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a recording\n" * 50)
    page.set_input_files("#recording-input", str(notes))
    expect(page.locator("#recording-status-text")).to_contain_text("Not analysed: could not "
                                                                   "decode")
    assert page.locator("#recording-result").is_hidden()
