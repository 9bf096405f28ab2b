"""The artifact store: audio clips and model files on the local disk, under one root.

Paths handed out and recorded in SQL are relative to the root (`clips/ab/ab12....wav`,
`models/3.safetensors`), so the data directory can be moved. Every file goes through
`storage.files.write_atomic`: a reader sees a whole file or none.
"""
import os
import re
import tempfile
from pathlib import Path

from storage.files import sha256_bytes, write_atomic

_EXTENSION = re.compile(r"^\.[a-z0-9]{1,8}$")


class ArtifactError(RuntimeError):
    """A stored file that is missing, unreadable or does not match its recorded sha256."""


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def put_clip(self, data: bytes, extension: str = ".bin") -> tuple[str, str]:
        """Store a clip under its sha256; returns (sha256, relative path). The same bytes sent
        again reuse the file already there."""
        digest = sha256_bytes(data)
        extension = extension.lower() if _EXTENSION.match(extension.lower()) else ".bin"
        relative = f"clips/{digest[:2]}/{digest}{extension}"
        path = self.path(relative)
        try:
            # The file may be an old one no row refers to any more (its user was forgotten):
            # a fresh time keeps the sweep (storage.sweep) off it until our row commits.
            os.utime(path)
        except FileNotFoundError:
            write_atomic(path, data)
        return digest, relative

    def incoming_file(self, suffix: str = ".upload") -> Path:
        """A new empty file for an upload being received (long recordings are not held in
        memory). It lies on the store's file system, so `move_clip_in` is one rename; the caller
        deletes it if it is not moved in, and a crash's leftover goes with the sweep."""
        folder = self.root / "incoming"
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, suffix=suffix)
        os.close(fd)
        return Path(name)

    def move_clip_in(self, source: Path, sha256: str, extension: str = ".bin") -> str:
        """`put_clip` for a file already written (an `incoming_file`, whose sha256 the caller
        computed while writing it): fsynced and renamed into place, or dropped when the same
        bytes are stored already. Returns the relative path."""
        extension = extension.lower() if _EXTENSION.match(extension.lower()) else ".bin"
        relative = f"clips/{sha256[:2]}/{sha256}{extension}"
        path = self.path(relative)
        try:
            os.utime(path)  # stored before: keep that file, fresh for the sweep
            Path(source).unlink(missing_ok=True)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(source, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(source, path)
        return relative

    def put_model(self, version: int, data: bytes) -> tuple[str, str]:
        """Write a model file atomically; returns (sha256, relative path)."""
        relative = f"models/{int(version)}.safetensors"
        write_atomic(self.path(relative), data)
        return sha256_bytes(data), relative

    def read_model(self, relative: str, expected_sha256: str) -> bytes:
        """The model file's bytes, checked against the sha256 recorded when it was written."""
        return self.read_checked(relative, expected_sha256)

    def read_checked(self, relative: str, expected_sha256: str) -> bytes:
        try:
            data = self.path(relative).read_bytes()
        except OSError as err:
            raise ArtifactError(f"cannot read artifact {relative}: {err.strerror}") from err
        digest = sha256_bytes(data)
        if digest != expected_sha256:
            raise ArtifactError(f"artifact {relative} is corrupt: sha256 {digest}, "
                                f"expected {expected_sha256}")
        return data

    def delete(self, relative: str) -> None:
        """Remove a stored file; a file already gone is not an error (deletion is retried after
        crashes)."""
        self.path(relative).unlink(missing_ok=True)

    def path(self, relative: str) -> Path:
        """The absolute path of a stored file. Paths come from the database; one pointing outside
        the root is refused rather than followed."""
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise ArtifactError(f"artifact path {relative!r} leaves the artifact store")
        return path
