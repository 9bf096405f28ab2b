"""Upload a clip, see the result, correct it in one click: by mouse and by keyboard alone."""
import re
import uuid

import pytest
from sqlalchemy import select

from learner.labels import DEFAULT_LABELS
from storage.models import Feedback
from tests.dashboard.conftest import expect, screenshot

pytestmark = pytest.mark.browser


def upload(page, path) -> str:
    """Upload through the picker; the id of the prediction the page shows."""
    page.goto("/#upload")
    page.set_input_files("#upload-input", str(path))
    card = page.wait_for_selector("#upload-result .result[data-prediction-id]")
    return card.get_attribute("data-prediction-id")


def test_an_uploaded_clip_shows_the_services_answer(open_dashboard, server, speech_file):
    page = open_dashboard()
    prediction_id = upload(page, speech_file)

    stored = server.get(f"/v1/predictions/{prediction_id}").json()
    result = page.locator("#upload-result")
    assert result.locator(".result-emotion").inner_text() == stored["emotion"].capitalize()
    assert f"model v{stored['model_version']}" in result.locator(".result-meta").inner_text()
    # A bar per label, each with the probability the service gave.
    rows = result.locator(".bar-row")
    assert rows.count() == len(DEFAULT_LABELS)
    for i, label in enumerate(DEFAULT_LABELS):
        assert rows.nth(i).locator(".bar-label").inner_text() == label.capitalize()
        shown = float(rows.nth(i).locator(".bar-value").inner_text().rstrip("%"))
        assert abs(shown - 100 * stored["probabilities"][label]) <= 0.5 + 1e-6
    assert page.locator("#upload-file-name").inner_text().startswith("speech.wav")

    # Dropped on the drop zone instead of picked: the same.
    dropped = page.evaluate_handle("""(bytes) => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([new Uint8Array(bytes)], "dropped.wav", {type: "audio/wav"}));
        return transfer;
    }""", list(speech_file.read_bytes()))
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": dropped})
    expect(page.locator("#upload-result .result-meta")).to_contain_text("dropped.wav")
    dropped_id = page.get_attribute("#upload-result .result", "data-prediction-id")
    assert dropped_id != prediction_id
    assert server.get(f"/v1/predictions/{dropped_id}").json()["emotion"] == stored["emotion"]


def test_a_correction_is_sent_in_one_click_and_counted(open_dashboard, server, speech_file):
    page = open_dashboard()
    prediction_id = upload(page, speech_file)
    predicted = server.get(f"/v1/predictions/{prediction_id}").json()["emotion"]
    right = "calm" if predicted != "calm" else "angry"

    page.click(f"#upload-result .label-button[data-label={right}]")
    status = page.locator("#upload-result .feedback-status.ok")
    status.wait_for()
    assert re.fullmatch(rf"Received: {right} \(correction #\d+\)\.", status.inner_text())
    assert page.locator("#corrections-count").inner_text() == "1"
    assert page.get_attribute(f".label-button[data-label={right}]", "aria-pressed") == "true"
    # Confirming the predicted label counts as well.
    page.click(f"#upload-result .label-button[data-label={predicted}]")
    expect(page.locator("#corrections-count")).to_have_text("2")
    assert "confirmation" in page.locator("#upload-result .feedback-status").inner_text()
    screenshot(page, "upload")

    with server.db() as session:
        stored = session.scalars(select(Feedback.label).where(
            Feedback.prediction_id == uuid.UUID(prediction_id)).order_by(Feedback.id)).all()
    assert stored == [right, predicted]


def test_upload_and_correct_from_the_keyboard(open_dashboard, server, speech_file):
    page = open_dashboard()
    page.goto("/#upload")
    page.locator("body").focus()
    assert tab_until(page, "#upload-input"), "Tab never reached the file picker"
    # The focused element shows a focus ring.
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
    chooser = open_file_chooser_from_the_keyboard(page)
    assert chooser is not None, "neither Space nor Enter opened the file picker"
    chooser.set_files(str(speech_file))
    page.wait_for_selector("#upload-result .label-button")

    assert tab_until(page, "#upload-result .label-button[data-label=sad]")
    page.keyboard.press("Enter")
    page.locator("#upload-result .feedback-status.ok").wait_for()
    assert page.locator("#corrections-count").inner_text() == "1"


def open_file_chooser_from_the_keyboard(page):
    """Either key opens a focused file input. Under a loaded CI machine Chromium has been seen to
    drop the first key press's file chooser now and then, so a second key gets its turn before
    the test gives up."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for key in ("Space", "Enter", "Space"):
        try:
            with page.expect_file_chooser(timeout=8000) as chooser:
                page.keyboard.press(key)
            return chooser.value
        except PlaywrightTimeout:
            continue
    return None


def tab_until(page, selector: str, limit: int = 40) -> bool:
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate("(s) => document.activeElement?.matches(s) ?? false", selector):
            return True
    return False
