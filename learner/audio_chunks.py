"""Long recordings in bounded memory: decode a file to 16 kHz mono float32 a few seconds at a time.

`decode_audio` holds a whole clip in memory, which is right for 30 s and wrong for 30 minutes
(a 30-minute 48 kHz stereo file is 690 MB of float32 before resampling). `AudioChunks` reads the
file through libsndfile's block reads, or FFmpeg's packet by packet, downmixes and resamples
each piece with a streaming resampler, and yields it; nothing holds more than one piece.
Bad input raises the same `AudioError` subclasses as `decode_audio`.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import soxr

from learner.audio import (_FORMATS, SAMPLE_RATE, EmptyAudio, InvalidSamples, TooLong,
                           UnreadableAudio)

CHUNK_SECONDS = 10.0


class AudioChunks:
    """Iterate to get (samples,) float32 chunks at SAMPLE_RATE; `fraction_read` says how far
    through the file the reader is (by bytes, which works whether or not the format tells
    its length). One pass only."""

    def __init__(self, path: str | os.PathLike, *, max_seconds: float,
                 chunk_seconds: float = CHUNK_SECONDS):
        self.path = Path(path)
        self.max_seconds = max_seconds
        self.chunk_seconds = chunk_seconds
        self.seconds = 0.0  # decoded so far, at the source rate
        self._file = None
        try:
            self._size = self.path.stat().st_size
        except OSError as err:
            raise UnreadableAudio(f"could not read the audio file: {err.strerror}") from err
        if self._size == 0:
            raise EmptyAudio("the audio file is empty (0 bytes)")

    @property
    def fraction_read(self) -> float:
        if self._file is None or self._file.closed:
            return 0.0
        return min(1.0, self._file.tell() / self._size)

    def __iter__(self) -> Iterator[np.ndarray]:
        with open(self.path, "rb") as self._file:
            pieces = self._soundfile_pieces() or self._pyav_pieces()
            resampler: soxr.ResampleStream | None = None
            produced = 0
            for samples, rate in pieces:
                if not np.isfinite(samples).all():
                    raise InvalidSamples("the audio contains invalid samples (NaN or infinity)")
                self.seconds += samples.shape[0] / rate
                self._check_length(self.seconds)
                mono = samples.mean(axis=1, dtype=np.float32)
                if rate != SAMPLE_RATE:
                    resampler = resampler or soxr.ResampleStream(rate, SAMPLE_RATE, 1,
                                                                 quality="HQ")
                    mono = resampler.resample_chunk(mono)
                produced += len(mono)
                if len(mono):
                    yield np.clip(mono, -1.0, 1.0)
            if resampler is not None:
                tail = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
                produced += len(tail)
                if len(tail):
                    yield np.clip(tail, -1.0, 1.0)
            if produced == 0:
                raise EmptyAudio("the audio file contains no samples")

    def _check_length(self, seconds: float) -> None:
        if seconds > self.max_seconds:
            raise TooLong(f"the audio is longer than the limit of {self.max_seconds:g} s")

    def _soundfile_pieces(self) -> Iterator[tuple[np.ndarray, int]] | None:
        """libsndfile's reader (WAV, FLAC, OGG...), or None when it does not know the format."""
        try:
            reader = sf.SoundFile(self._file)
        except Exception:
            self._file.seek(0)
            return None
        # The header knows the length: refuse an hour-long file before decoding any of it.
        self._check_length(reader.frames / reader.samplerate)
        block = int(self.chunk_seconds * reader.samplerate)

        def pieces() -> Iterator[tuple[np.ndarray, int]]:
            with reader:
                for samples in reader.blocks(block, dtype="float32", always_2d=True):
                    yield samples, reader.samplerate
        return pieces()

    def _pyav_pieces(self) -> Iterator[tuple[np.ndarray, int]]:
        """FFmpeg's decoder (WebM, MP4, MP3...), one decoded frame at a time."""
        try:
            container = av.open(self._file)
        except Exception as err:
            raise UnreadableAudio(f"could not decode the file as audio ({_FORMATS}...)") from err
        with container:
            if not container.streams.audio:
                raise UnreadableAudio("the file has no audio track")
            if container.duration:
                self._check_length(container.duration / av.time_base)
            # Planar float keeps channels apart, so we downmix the same way as for libsndfile.
            resampler = av.AudioResampler(format="fltp")
            try:
                for frame in container.decode(container.streams.audio[0]):
                    for out in resampler.resample(frame):
                        yield out.to_ndarray().T, out.sample_rate
                for out in resampler.resample(None):
                    yield out.to_ndarray().T, out.sample_rate
            except av.FFmpegError as err:
                raise UnreadableAudio(f"the audio stream is damaged ({err})") from err


def read_span(path: str | os.PathLike, start_s: float, end_s: float, *,
              max_seconds: float) -> np.ndarray:
    """The 16 kHz samples between start_s and end_s of a long file, decoded a piece at a time
    (only the span is kept)."""
    first, last = int(start_s * SAMPLE_RATE), int(end_s * SAMPLE_RATE)
    kept, position = [], 0
    for chunk in AudioChunks(path, max_seconds=max_seconds):
        if position + len(chunk) > first and position < last:
            kept.append(chunk[max(0, first - position):last - position])
        position += len(chunk)
        if position >= last:
            break
    return np.concatenate(kept) if kept else np.zeros(0, np.float32)
