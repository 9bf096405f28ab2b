"""Long recordings: chunked decoding and the windowed, smoothed timeline, with the bundled
default model on synthetic audio (real decoding, real model; no corpus needed)."""
import numpy as np
import pytest

from learner.audio import (SAMPLE_RATE, EmptyAudio, SilentAudio, TooLong, TooShort,
                           UnreadableAudio, decode_audio)
from learner.audio_chunks import AudioChunks
from learner.checkpoint import load_default_model
from learner.inference import EmotionPredictor
from learner.smoothing import SILENCE
from learner.timeline import analyse_recording, segments
from storage.settings import TimelineSettings
from service.bench.clips import to_wav, to_webm_opus, voiced_clip


@pytest.fixture(scope="module")
def predictor() -> EmotionPredictor:
    return EmotionPredictor(load_default_model())


def write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def chunks_of(wave: np.ndarray, seconds: float):
    step = int(seconds * SAMPLE_RATE)
    return (wave[i:i + step] for i in range(0, len(wave), step))


def test_chunked_decoding_matches_decoding_the_whole_file(tmp_path):
    stereo = np.stack([voiced_clip(12.0, 44_100), 0.8 * voiced_clip(12.0, 44_100)], axis=1)
    path = write(tmp_path, "long.wav", to_wav(stereo, 44_100))
    chunks = AudioChunks(path, max_seconds=60, chunk_seconds=2.5)
    pieces = list(chunks)
    assert len(pieces) > 4 and chunks.fraction_read == 0.0  # closed once done
    whole = decode_audio(path, max_seconds=60)
    joined = np.concatenate(pieces)
    assert abs(len(joined) - len(whole)) <= 1
    n = min(len(joined), len(whole))
    # Streaming and one-shot resampling agree except within a filter length of the ends.
    np.testing.assert_allclose(joined[100:n - 100], whole[100:n - 100], atol=2e-3)


def test_chunked_decoding_reads_browser_webm_and_refuses_bad_files(tmp_path):
    webm = write(tmp_path, "a.webm", to_webm_opus(voiced_clip(4.0, 48_000)))
    assert abs(sum(len(c) for c in AudioChunks(webm, max_seconds=60)) / SAMPLE_RATE - 4.0) < 0.1
    with pytest.raises(TooLong):
        list(AudioChunks(webm, max_seconds=2))
    with pytest.raises(TooLong):  # known from the WAV header, before decoding
        list(AudioChunks(write(tmp_path, "b.wav", to_wav(voiced_clip(5.0), SAMPLE_RATE)),
                         max_seconds=4))
    with pytest.raises(UnreadableAudio):
        list(AudioChunks(write(tmp_path, "c.txt", b"not audio at all " * 100), max_seconds=60))
    with pytest.raises(EmptyAudio):
        AudioChunks(write(tmp_path, "d.wav", b""), max_seconds=60)


def test_windows_cover_the_recording_and_pauses_are_silence(predictor):
    wave = np.concatenate([voiced_clip(4.0, seed=1), np.zeros(5 * SAMPLE_RATE, np.float32),
                           voiced_clip(1.5, seed=2)])  # 10.5 s
    timeline = analyse_recording(chunks_of(wave, 2.0), predictor)
    starts = [w.start for w in timeline.windows]
    assert starts == [0, 1, 2, 3, 4, 5, 6, 7, 7.5]  # 1 s hop, the tail ends at the end
    assert timeline.windows[-1].end == timeline.duration_s == 10.5
    silent = [w for w in timeline.windows if w.raw == SILENCE]
    assert [w.start for w in silent] == [4, 5, 6]  # the windows inside the pause (4-9 s)
    assert all(w.probabilities is None and w.smoothed == SILENCE for w in silent)
    speech = [w for w in timeline.windows if w.raw != SILENCE]
    assert all(abs(sum(w.probabilities.values()) - 1) < 1e-5 for w in speech)
    assert all(w.raw == max(w.probabilities, key=w.probabilities.get) for w in speech)
    # Segments tile the recording, and the pause is one of them.
    segs = timeline.segments
    assert segs[0].start == 0 and segs[-1].end == 10.5
    assert all(a.end == b.start and a.emotion != b.emotion for a, b in zip(segs, segs[1:]))
    assert any(s.emotion == SILENCE and s.confidence is None for s in segs)
    assert all(0 < s.confidence <= 1 for s in segs if s.emotion != SILENCE)


def test_the_answer_does_not_depend_on_how_the_audio_was_chunked(predictor):
    wave = voiced_clip(9.3, seed=3)
    a = analyse_recording(chunks_of(wave, 0.7), predictor, TimelineSettings(batch_size=3))
    b = analyse_recording([wave], predictor)
    assert [(w.start, w.end, w.raw, w.smoothed) for w in a.windows] == \
           [(w.start, w.end, w.raw, w.smoothed) for w in b.windows]
    assert [(s.start, s.end, s.emotion) for s in a.segments] == \
           [(s.start, s.end, s.emotion) for s in b.segments]
    # Batches of another size differ only in float rounding.
    assert [s.confidence for s in a.segments] == pytest.approx([s.confidence for s in b.segments])


def test_short_recordings_are_one_window_and_empty_or_silent_ones_are_refused(predictor):
    timeline = analyse_recording([voiced_clip(1.2)], predictor)
    assert [(w.start, w.end) for w in timeline.windows] == [(0.0, 1.2)]
    with pytest.raises(SilentAudio):
        analyse_recording([np.zeros(20 * SAMPLE_RATE, np.float32)], predictor)
    with pytest.raises(TooShort):
        analyse_recording([voiced_clip(0.1)], predictor)


def test_segments_meet_where_the_new_emotion_takes_over_between_window_centres():
    from learner.timeline import Window
    steady = {"happy": 0.7, "sad": 0.3}
    windows = [Window(k, k + 3, steady, "happy", "happy") for k in range(6)]
    segs = segments(windows, ["happy"] * 3 + ["sad"] * 3, duration_s=8.0)
    # The two windows either side do not lean towards sad: half-way between their centres.
    assert [(s.start, s.end, s.emotion) for s in segs] == [(0, 4.0, "happy"), (4.0, 8.0, "sad")]
    assert segs[0].confidence == pytest.approx(0.7) and segs[1].confidence == pytest.approx(0.3)
    # Sad's share of happy + sad goes 0.4 -> 0.8 from the centre at 3.5 s to the one at 4.5 s:
    # it crosses one half a quarter of the way, so the change is put at 3.75 s.
    leaning = [Window(k, k + 3, {"happy": 1 - q, "sad": q}, "x", "x")
               for k, q in enumerate([0.1, 0.2, 0.4, 0.8, 0.9, 0.9])]
    segs = segments(leaning, ["happy"] * 3 + ["sad"] * 3, duration_s=8.0)
    assert [(s.start, s.end, s.emotion) for s in segs] == [(0, 3.75, "happy"),
                                                            (3.75, 8.0, "sad")]
    # Windows sure of a third emotion give both states nothing to weigh: half-way again.
    third = [Window(k, k + 3, {"happy": 0.0, "sad": 0.0, "angry": 1.0}, "x", "x")
             for k in range(6)]
    segs = segments(third, ["happy"] * 3 + ["sad"] * 3, duration_s=8.0)
    assert [(s.start, s.end) for s in segs] == [(0, 4.0), (4.0, 8.0)]


def test_a_live_stream_answers_each_window_as_it_completes_like_the_whole_recording(predictor):
    from learner.timeline import LiveTimeline
    wave = np.concatenate([voiced_clip(6.0, seed=4), np.zeros(4 * SAMPLE_RATE, np.float32),
                           voiced_clip(4.0, seed=5)])  # 14 s
    live = LiveTimeline(predictor, TimelineSettings(), keep_s=5.0)
    answered = []
    for chunk in chunks_of(wave, 0.25):  # a browser's quarter-second chunks
        answered += live.push(chunk)
    whole = analyse_recording([wave], predictor)
    assert [i for i, _ in answered] == list(range(12))  # window k ends at k + 3 s
    assert [(w.start, w.raw, w.smoothed) for _, w in answered] == \
           [(w.start, w.raw, w.smoothed) for w in whole.windows[:12]]
    # Only the last 5 s of audio stay: recent windows can be cut out, older ones are gone.
    assert len(live.audio) == 5 * SAMPLE_RATE
    np.testing.assert_array_equal(live.window_audio(11), wave[11 * SAMPLE_RATE:14 * SAMPLE_RATE])
    assert live.window_audio(5) is None and live.window_audio(99) is None
