import os

import pytest

from storage.artifacts import ArtifactError, ArtifactStore
from storage.files import sha256_bytes


def files_under(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_model_file_is_written_whole_with_its_sha256_and_read_back_checked(artifacts):
    data = b"weights" * 1000
    sha256, path = artifacts.put_model(7, data)
    assert (sha256, path) == (sha256_bytes(data), "models/7.safetensors")
    assert files_under(artifacts.root) == ["models/7.safetensors"]  # no temp file left behind
    assert artifacts.read_model(path, sha256) == data


def test_a_corrupt_or_missing_model_file_is_refused(artifacts):
    sha256, path = artifacts.put_model(1, b"good weights")
    artifacts.path(path).write_bytes(b"tampered weights")
    with pytest.raises(ArtifactError, match="corrupt"):
        artifacts.read_model(path, sha256)
    with pytest.raises(ArtifactError, match="cannot read"):
        artifacts.read_model("models/99.safetensors", sha256)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(artifacts, monkeypatch):
    _, path = artifacts.put_model(1, b"old")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        artifacts.put_model(1, b"new")
    assert artifacts.path(path).read_bytes() == b"old"
    assert files_under(artifacts.root) == ["models/1.safetensors"]


def test_clips_are_content_addressed_and_stored_once(artifacts):
    first = artifacts.put_clip(b"audio bytes", ".WAV")
    again = artifacts.put_clip(b"audio bytes", ".wav")
    other = artifacts.put_clip(b"other audio", ".ogg")
    digest = sha256_bytes(b"audio bytes")
    assert first == again == (digest, f"clips/{digest[:2]}/{digest}.wav")
    assert other[1].endswith(".ogg")
    assert len(files_under(artifacts.root)) == 2


def test_odd_extensions_become_bin(artifacts):
    _, path = artifacts.put_clip(b"x", "../../etc")
    assert path.endswith(".bin")


def test_paths_outside_the_store_are_refused(artifacts):
    with pytest.raises(ArtifactError, match="leaves the artifact store"):
        artifacts.path("../../etc/passwd")


def test_delete_removes_the_file_and_tolerates_it_being_gone(artifacts):
    _, path = artifacts.put_clip(b"audio", ".wav")
    artifacts.delete(path)
    artifacts.delete(path)
    assert files_under(artifacts.root) == []


def test_the_store_root_is_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = ArtifactStore("relative")
    monkeypatch.chdir("/")
    _, path = store.put_clip(b"a", ".wav")
    assert (tmp_path / "relative" / path).is_file()
