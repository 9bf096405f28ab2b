"""The `emoloop` command line end to end on generated audio: train, evaluate, predict, bench;
and the encoder import on a hand-made CTranslate2 file."""
import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from learner.speech_encoder import weights
from service import cli
from service.bench.clips import voiced_clip
from storage.files import sha256_bytes
from tests.learner.test_speech_encoder import tiny_whisper_ct2
from tests.learner.toy_corpus import make_corpus

REPO = Path(__file__).resolve().parents[2]
EMOLOOP = str(Path(sys.executable).with_name("emoloop"))


def emoloop(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EMOLOOP, *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_model(toy_corpus, tmp_path_factory) -> Path:
    """`emoloop train` with the base recipe cut down to seconds on the toy corpus."""
    config = yaml.safe_load((REPO / "configs" / "base-training.yaml").read_text())
    config["corpora"] = ["toy"]
    config["labels"] = ["happy", "sad"]
    config["split"] = {"validation_speakers": ["toy-a03"], "test_speakers": ["toy-a04"]}
    config["augment"]["variants"] = 2
    config["train"].update(epochs=2, patience=2, batch_size=8, workers=1)
    folder = tmp_path_factory.mktemp("model")
    (folder / "tiny.yaml").write_text(yaml.safe_dump(config))
    out = folder / "model.safetensors"
    result = emoloop("train", "--config", str(folder / "tiny.yaml"), "--data", str(toy_corpus),
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    info = json.loads(out.with_suffix(".json").read_text())
    assert summary["sha256"] == info["sha256"]
    assert info["split"]["test_speakers"] == ["toy-a04"] and info["test"]["n"] == 8
    return out


def test_evaluate_prints_the_documented_json_and_writes_a_report(tiny_model, toy_corpus, tmp_path):
    result = emoloop("evaluate", "--data", str(toy_corpus), "--model", str(tiny_model),
                     "--json", "--report-dir", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("accuracy", "macro_f1", "unweighted_accuracy", "n", "skipped", "per_class", "per_corpus"):
        assert key in report
    assert report["n"] == 32 and report["skipped"] == 0
    assert set(report["per_class"]) == {"happy", "sad"}
    assert set(report["per_class"]["sad"]) == {"precision", "recall", "f1", "support"}
    assert set(report["per_corpus"]["toy"]) == {"accuracy", "macro_f1", "unweighted_accuracy", "n"}
    assert (tmp_path / "report" / "report.md").read_text().startswith("# emoloop evaluation")
    assert (tmp_path / "report" / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_counts_labels_the_model_does_not_know_as_skipped(tiny_model, tmp_path):
    corpus = make_corpus(tmp_path, corpus="other", speakers=1, per_label=2)
    manifest = corpus / "other" / "manifest.csv"
    manifest.write_text(manifest.read_text().replace(",sad,sad,", ",fearful,fearful,"))
    result = emoloop("evaluate", "--data", str(corpus), "--model", str(tiny_model), "--json")
    report = json.loads(result.stdout)
    assert (report["n"], report["skipped"]) == (2, 2)


def test_predict_answers_each_file_and_a_bad_file_gets_one_line(tiny_model, tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, voiced_clip(1.5), 16_000)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"this is not audio at all" * 10)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16_000, np.float32), 16_000)
    result = emoloop("predict", str(good), str(bad), str(silent), str(tmp_path / "missing.wav"),
                     "--model", str(tiny_model), "--json")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 1  # some files failed
    assert lines[0]["file"] == str(good) and lines[0]["emotion"] in ("happy", "sad")
    assert set(lines[0]["probabilities"]) == {"happy", "sad"}
    assert [line.get("error") for line in lines[1:]] == ["unreadable_audio", "silent_audio",
                                                         "unreadable_audio"]
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 3 and "Traceback" not in result.stderr
    assert errors[0].startswith(f"{bad}: error: ")


def test_bench_latency_reports_medians_and_targets(tiny_model):
    result = emoloop("bench", "latency", "--model", str(tiny_model), "--runs", "5",
                     "--cold-starts", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["median_ms"] > 0 and report["p95_ms"] >= report["median_ms"]
    assert report["cold_start_s"] > 0 and report["parameters"] > 0
    assert set(report["clips"]) == {"wav-16k", "webm-opus-48k"}


def test_evaluate_on_named_speakers_only(tiny_model, toy_corpus):
    result = emoloop("evaluate", "--data", str(toy_corpus), "--model", str(tiny_model),
                     "--speakers", "toy-a04", "--json")
    assert json.loads(result.stdout)["n"] == 8
    result = emoloop("evaluate", "--data", str(toy_corpus), "--speakers", "nobody", "--json")
    assert result.returncode == 2 and "nobody" in result.stderr and "Traceback" not in result.stderr


def test_evaluate_refuses_an_encoder_for_a_model_that_reads_none(tiny_model, toy_corpus,
                                                                 tmp_path):
    encoder = tmp_path / "some_encoder.safetensors"
    encoder.write_bytes(b"anything")
    result = emoloop("evaluate", "--data", str(toy_corpus), "--model", str(tiny_model),
                     "--encoder", str(encoder), "--json")
    assert result.returncode == 2 and result.stdout == ""
    assert "reads no speech encoder" in result.stderr and "Traceback" not in result.stderr


def test_encoder_import_refuses_a_file_that_is_not_the_pinned_whisper(tmp_path):
    ct2 = tmp_path / "model.bin"
    ct2.write_bytes(tiny_whisper_ct2())
    out = tmp_path / "encoder.safetensors"
    result = emoloop("encoder", "import", str(ct2), "--blocks", "2", "--out", str(out))
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "sha256" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_encoder_import_writes_the_kept_blocks_and_prints_path_sha256_and_size(
        tmp_path, monkeypatch, capsys):
    data = tiny_whisper_ct2()
    ct2 = tmp_path / "model.bin"
    ct2.write_bytes(data)
    # Pin the hand-made file in place of Whisper's, in this process only.
    monkeypatch.setattr(weights, "import_encoder", functools.partial(
        weights.import_encoder, pinned={sha256_bytes(data): "hand-made, {n} blocks"}))
    out = tmp_path / "encoder.safetensors"
    assert cli.main(["encoder", "import", str(ct2), "--blocks", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and sha256_bytes(out.read_bytes()) in printed
    assert f"{out.stat().st_size:,} bytes" in printed
    assert weights.load_encoder(out, sha256_bytes(out.read_bytes())).config.n_blocks == 2


def test_analyze_prints_segments_json_and_csv_with_a_progress_bar(tmp_path, capsys):
    wave = np.concatenate([voiced_clip(8.0, 16_000, seed=1), np.zeros(5 * 16_000, np.float32),
                           voiced_clip(6.0, 16_000, seed=2)])
    talk = str(tmp_path / "talk.flac")
    sf.write(talk, wave, 16_000)

    def analyze(*args: str) -> tuple[int, str, str]:
        code = cli.main(["analyze", *args])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = analyze(talk, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["duration_s"] == 19.0 and len(report["windows"]) == 17
    assert report["segments"][0]["start"] == 0 and report["segments"][-1]["end"] == 19.0
    assert "silence" in [s["emotion"] for s in report["segments"]]
    assert "100%" in err  # the progress bar, on stderr
    rows = analyze(talk, "--csv", "--quiet")[1].splitlines()
    assert rows[0].startswith("start,end,raw,smoothed,neutral") and len(rows) == 18
    assert "silence" in analyze(talk)[1]
    (tmp_path / "notes.txt").write_text("not audio")
    code, out, _ = analyze(str(tmp_path / "notes.txt"), "--json")
    assert code == 1 and json.loads(out)["error"] == "unreadable_audio"
