"""The frozen speech encoder: the CTranslate2 reader, the pinned import, the encoder's math held to
a plain reference, batching with padding, and Whisper's log-mel held to librosa's. Every file here
is a tiny hand-made one; the real 145 MB Whisper file is never read."""
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors

from learner.checkpoint import ENCODER_DIR
from learner.file_metadata import read_metadata, save_with_metadata
from learner.speech_encoder.ct2_file import CT2FormatError, read_ct2, write_ct2
from learner.speech_encoder.weights import (IMPORT_FILE_NAMES, PINNED_SOURCES, WHISPER_BASE_SHA256,
                                             EncoderFileError, import_encoder, load_encoder)
from learner.speech_encoder.whisper_encoder import ct2_names
from learner.speech_encoder.whisper_mel import whisper_log_mel
from service.bench.clips import voiced_clip
from storage.files import sha256_bytes

WIDTH, HEADS, LAYERS, N_MELS, MAX_FRAMES = 16, 2, 3, 80, 64


def hand_made(ct2: bytes) -> dict[str, str]:
    """The pinned sources an import of the hand-made file accepts: that file alone."""
    return {sha256_bytes(ct2): "a hand-made Whisper file, first {n} blocks"}


def tiny_whisper_variables(seed: int = 0) -> dict[str, np.ndarray]:
    """A Whisper-shaped CTranslate2 variable set, float16 like the real file, with a few decoder
    variables it also carries and the int16 scalar head count."""
    rng = np.random.default_rng(seed)

    def f16(*shape, scale=0.3, offset=0.0):
        return (offset + scale * rng.standard_normal(shape)).astype(np.float16)

    v = {"encoder/conv1/weight": f16(WIDTH, N_MELS, 3, scale=0.1), "encoder/conv1/bias": f16(WIDTH),
         "encoder/conv2/weight": f16(WIDTH, WIDTH, 3, scale=0.15), "encoder/conv2/bias": f16(WIDTH),
         "encoder/position_encodings/encodings": f16(MAX_FRAMES, WIDTH)}
    for i in range(LAYERS):
        layer = f"encoder/layer_{i}"
        for norm in ("self_attention/layer_norm", "ffn/layer_norm"):
            v[f"{layer}/{norm}/gamma"] = f16(WIDTH, scale=0.1, offset=1.0)
            v[f"{layer}/{norm}/beta"] = f16(WIDTH, scale=0.1)
        qkv_bias = f16(3 * WIDTH)
        qkv_bias[WIDTH : 2 * WIDTH] = 0  # Whisper's key projection has no bias
        v[f"{layer}/self_attention/linear_0/weight"] = f16(3 * WIDTH, WIDTH)
        v[f"{layer}/self_attention/linear_0/bias"] = qkv_bias
        v[f"{layer}/self_attention/linear_1/weight"] = f16(WIDTH, WIDTH)
        v[f"{layer}/self_attention/linear_1/bias"] = f16(WIDTH)
        v[f"{layer}/ffn/linear_0/weight"] = f16(4 * WIDTH, WIDTH)
        v[f"{layer}/ffn/linear_0/bias"] = f16(4 * WIDTH)
        v[f"{layer}/ffn/linear_1/weight"] = f16(WIDTH, 4 * WIDTH, scale=0.15)
        v[f"{layer}/ffn/linear_1/bias"] = f16(WIDTH)
    v["encoder/layer_norm/gamma"], v["encoder/layer_norm/beta"] = f16(WIDTH), f16(WIDTH)
    v["encoder/num_heads"] = np.array(HEADS, np.int16)
    v["decoder/num_heads"] = np.array(HEADS, np.int16)
    v["decoder/embeddings/weight"] = f16(50, WIDTH)
    v["decoder/layer_0/ffn/linear_0/weight"] = f16(4 * WIDTH, WIDTH)
    return v


def tiny_whisper_ct2(seed: int = 0) -> bytes:
    return write_ct2("WhisperSpec", tiny_whisper_variables(seed))


@pytest.fixture(scope="module")
def variables() -> dict[str, np.ndarray]:
    return tiny_whisper_variables()


@pytest.fixture(scope="module")
def ct2_bytes(variables) -> bytes:
    return write_ct2("WhisperSpec", variables)


@pytest.fixture
def encoder_file(ct2_bytes, tmp_path):
    """The tiny file imported with all its blocks: (path, sha256)."""
    data = import_encoder(ct2_bytes, LAYERS, pinned=hand_made(ct2_bytes))
    path = tmp_path / "encoder.safetensors"
    path.write_bytes(data)
    return path, sha256_bytes(data)


# --- the CTranslate2 file -------------------------------------------------------------------

def test_read_ct2_returns_exactly_the_written_arrays(ct2_bytes, variables):
    spec, read = read_ct2(ct2_bytes)
    assert spec == "WhisperSpec" and list(read) == list(variables)
    for name, array in variables.items():
        assert read[name].dtype == array.dtype and read[name].shape == array.shape, name
        np.testing.assert_array_equal(read[name], array)
    assert read["encoder/num_heads"].shape == () and int(read["encoder/num_heads"]) == HEADS


def test_read_ct2_copies_only_wanted_variables(ct2_bytes):
    _, read = read_ct2(ct2_bytes, lambda name: name.startswith("decoder/"))
    assert set(read) == {"decoder/num_heads", "decoder/embeddings/weight",
                         "decoder/layer_0/ffn/linear_0/weight"}


@pytest.mark.parametrize("keep", [0, 3, 21, 5_000, -10])
def test_truncated_file_is_a_format_error(ct2_bytes, keep):
    with pytest.raises(CT2FormatError):
        read_ct2(ct2_bytes[:keep])


def test_other_binary_version_is_a_format_error(ct2_bytes):
    with pytest.raises(CT2FormatError, match="version 5"):
        read_ct2(struct.pack("<I", 5) + ct2_bytes[4:])


# --- import and load ------------------------------------------------------------------------

def test_import_keeps_the_stem_and_first_blocks_only(ct2_bytes, variables):
    data = import_encoder(ct2_bytes, 2, pinned=hand_made(ct2_bytes))
    tensors = load_safetensors(data)
    assert set(tensors) == set(ct2_names(2))
    assert not any(k.startswith("blocks.2.") for k in tensors)
    for ours, theirs in ct2_names(2).items():
        assert tensors[ours].dtype == torch.float16
        np.testing.assert_array_equal(tensors[ours].numpy(), variables[theirs])
    metadata = read_metadata(data)
    assert metadata["config"] == {"n_mels": N_MELS, "width": WIDTH, "heads": HEADS, "n_blocks": 2,
                                  "max_frames": MAX_FRAMES, "precision": "float32"}
    assert metadata["source_sha256"] == sha256_bytes(ct2_bytes)


def test_import_refuses_a_file_that_is_not_the_pinned_one(ct2_bytes):
    with pytest.raises(EncoderFileError, match="sha256"):
        import_encoder(ct2_bytes, 2, pinned={"0" * 64: "another file"})
    with pytest.raises(EncoderFileError, match="sha256"):
        import_encoder(ct2_bytes, 2)  # the real Whisper base and tiny.en files' sha256


def test_import_records_where_the_pinned_file_came_from(ct2_bytes):
    data = import_encoder(ct2_bytes, 2, pinned={"0" * 64: "another file",
                                                **hand_made(ct2_bytes)})
    assert read_metadata(data)["provenance"] == "a hand-made Whisper file, first 2 blocks"


def test_a_re_import_writes_what_the_bundled_encoders_record():
    """The provenance is part of the file, so of the sha256 a model names: importing a source
    again must write the text its bundled file records, under the name models look for."""
    bundled = sorted(ENCODER_DIR.glob("*_encoder.safetensors"))
    assert bundled
    for path in bundled:
        metadata = read_metadata(path.read_bytes())
        source = metadata["source_sha256"]
        assert path.name == IMPORT_FILE_NAMES[source]
        assert (PINNED_SOURCES[source].format(n=metadata["config"]["n_blocks"])
                == metadata["provenance"])


def test_a_re_import_of_whisper_base_records_what_the_earlier_default_encoder_recorded():
    """Versions trained on Whisper base's two int8 blocks (the default before tiny.en's) name
    that file's sha256 (dc0ca935...81d41); its recorded text, kept here since the file no longer
    ships, must come out of an import of base again, byte for byte."""
    assert PINNED_SOURCES[WHISPER_BASE_SHA256].format(n=2) == (
        "Whisper base encoder, first 2 blocks. Weights (c) 2022 OpenAI, MIT licence; from the "
        "CTranslate2 conversion (faster-whisper-base model.bin, sha256 "
        "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9).")


def test_import_refuses_more_blocks_than_the_file_has(ct2_bytes):
    with pytest.raises(EncoderFileError, match="fewer than 4"):
        import_encoder(ct2_bytes, LAYERS + 1, pinned=hand_made(ct2_bytes))


def test_load_gives_a_frozen_float32_encoder_with_the_file_values(encoder_file, variables):
    path, digest = encoder_file
    encoder = load_encoder(path, digest)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    state = encoder.state_dict()
    assert set(state) == set(ct2_names(LAYERS))
    for ours, theirs in ct2_names(LAYERS).items():
        assert state[ours].dtype == torch.float32
        np.testing.assert_array_equal(state[ours].numpy(), variables[theirs].astype(np.float32))


def test_load_refuses_a_file_with_one_flipped_byte(encoder_file):
    path, digest = encoder_file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(EncoderFileError, match="checksum"):
        load_encoder(path, digest)


def test_load_refuses_garbage_a_wrong_shape_and_a_missing_file(encoder_file, tmp_path):
    path, _ = encoder_file
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" * 20)
    with pytest.raises(EncoderFileError, match="not a valid encoder file"):
        load_encoder(garbage, None)
    # Right tensors, but a header claiming a wider encoder: refused whole, never half-loaded.
    data = path.read_bytes()
    metadata = read_metadata(data)
    metadata["config"]["width"] = 2 * WIDTH
    wrong = tmp_path / "wrong.safetensors"
    wrong.write_bytes(save_with_metadata(load_safetensors(data), metadata))
    with pytest.raises(EncoderFileError, match="not a valid encoder file"):
        load_encoder(wrong, None)
    with pytest.raises(EncoderFileError, match="cannot read"):
        load_encoder(tmp_path / "missing.safetensors", None)


# --- the encoder's math ---------------------------------------------------------------------

def reference_encoder(v: dict[str, np.ndarray], mel: np.ndarray) -> list[torch.Tensor]:
    """Whisper's encoder blocks written out plainly in float64: (T, 80) -> each block's (T', D)."""
    w = {k: torch.from_numpy(a.astype(np.float64)) for k, a in v.items() if a.ndim}

    def gelu(x):  # exact, erf-based
        return 0.5 * x * (1.0 + torch.erf(x / np.sqrt(2.0)))

    x = torch.from_numpy(mel.astype(np.float64)).T[None]  # (1, 80, T)
    x = gelu(F.conv1d(x, w["encoder/conv1/weight"], w["encoder/conv1/bias"], padding=1))
    x = gelu(F.conv1d(x, w["encoder/conv2/weight"], w["encoder/conv2/bias"], stride=2, padding=1))
    x = x[0].T + w["encoder/position_encodings/encodings"][: x.shape[-1]]  # (T', D)
    head = WIDTH // HEADS
    states = []
    for i in range(LAYERS):
        p = f"encoder/layer_{i}/"
        h = F.layer_norm(x, (WIDTH,), w[p + "self_attention/layer_norm/gamma"],
                         w[p + "self_attention/layer_norm/beta"])
        qkv = h @ w[p + "self_attention/linear_0/weight"].T + w[p + "self_attention/linear_0/bias"]
        q, k, val = qkv[:, :WIDTH], qkv[:, WIDTH : 2 * WIDTH], qkv[:, 2 * WIDTH :]
        heads = []
        for j in range(HEADS):
            cols = slice(j * head, (j + 1) * head)
            scores = torch.softmax(q[:, cols] @ k[:, cols].T / np.sqrt(head), dim=-1)
            heads.append(scores @ val[:, cols])
        x = x + torch.cat(heads, dim=1) @ w[p + "self_attention/linear_1/weight"].T \
            + w[p + "self_attention/linear_1/bias"]
        h = F.layer_norm(x, (WIDTH,), w[p + "ffn/layer_norm/gamma"], w[p + "ffn/layer_norm/beta"])
        h = gelu(h @ w[p + "ffn/linear_0/weight"].T + w[p + "ffn/linear_0/bias"])
        x = x + h @ w[p + "ffn/linear_1/weight"].T + w[p + "ffn/linear_1/bias"]
        states.append(x)
    return states


def random_mel(frames: int, seed: int) -> np.ndarray:
    """Values in Whisper's log-mel range (about -1.5 to 1.5)."""
    return np.random.default_rng(seed).uniform(-1.5, 1.5, (frames, N_MELS)).astype(np.float32)


@pytest.mark.parametrize("frames", [57, 90])
def test_encoder_equals_a_plain_reference(encoder_file, variables, frames):
    encoder = load_encoder(*encoder_file)
    mel = random_mel(frames, seed=frames)
    with torch.no_grad():
        states, lengths = encoder(torch.from_numpy(mel)[None], torch.tensor([frames]))
    assert states.shape == (LAYERS, 1, (frames + 1) // 2, WIDTH)
    assert lengths.tolist() == [(frames + 1) // 2]
    for ours, expected in zip(states[:, 0], reference_encoder(variables, mel)):
        assert float(expected.abs().max()) > 1.0  # not a trivially small comparison
        np.testing.assert_allclose(ours.numpy(), expected.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8"])
def test_a_clip_gives_the_same_states_alone_and_batched_with_padding(ct2_bytes, tmp_path, precision):
    """Also in int8, whose activation scale is taken per call, and in bfloat16, whose rounding
    follows the batch's shape: a neighbour never moves a clip."""
    path = tmp_path / "encoder.safetensors"
    path.write_bytes(import_encoder(ct2_bytes, LAYERS, precision=precision,
                                    pinned=hand_made(ct2_bytes)))
    encoder = load_encoder(path, None)
    mels = [random_mel(37, seed=1), random_mel(60, seed=2), random_mel(8, seed=3)]
    batch = torch.zeros(len(mels), 60, N_MELS)
    for i, mel in enumerate(mels):
        batch[i, : len(mel)] = torch.from_numpy(mel)
    with torch.no_grad():
        batched, lengths = encoder(batch, torch.tensor([len(m) for m in mels]))
        assert lengths.tolist() == [19, 30, 4]
        for i, mel in enumerate(mels):
            alone, _ = encoder(torch.from_numpy(mel)[None], torch.tensor([len(mel)]))
            valid = batched[:, i, : lengths[i]]
            assert alone.shape[2] == lengths[i]
            np.testing.assert_allclose(valid.numpy(), alone[:, 0].numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_a_lower_precision_encoder_agrees_with_float32_and_is_a_file_of_its_own(
        ct2_bytes, tmp_path, precision):
    """The file records its precision, so a model trained on it names its sha256 (and is served
    the states it was trained on); the states stay close to float32's, in float32."""
    files = {}
    for p in ("float32", precision):
        files[p] = tmp_path / f"{p}.safetensors"
        files[p].write_bytes(import_encoder(ct2_bytes, LAYERS, precision=p,
                                            pinned=hand_made(ct2_bytes)))
    assert sha256_bytes(files["float32"].read_bytes()) != sha256_bytes(files[precision].read_bytes())
    exact, lower = load_encoder(files["float32"], None), load_encoder(files[precision], None)
    if precision == "int8":
        float32 = {name for name, m in lower.named_modules() if type(m) is torch.nn.Linear}
        assert float32 == {"blocks.0.qkv", "blocks.0.attn_out"}  # the rest runs in int8
    mels = [random_mel(37, seed=1), random_mel(60, seed=2)]
    batch = torch.stack([torch.from_numpy(np.pad(m, ((0, 60 - len(m)), (0, 0)))) for m in mels])
    with torch.no_grad():
        ref, lengths = exact(batch, torch.tensor([37, 60]))
        ours, _ = lower(batch, torch.tensor([37, 60]))
    assert ours.dtype == torch.float32
    for i, n in enumerate(lengths.tolist()):
        a, b = ref[:, i, :n], ours[:, i, :n]
        assert 0 < float((a - b).norm() / a.norm()) < 0.05


def test_import_refuses_an_unknown_precision(ct2_bytes):
    with pytest.raises(EncoderFileError, match="precision"):
        import_encoder(ct2_bytes, 2, precision="float8", pinned=hand_made(ct2_bytes))


def test_encoder_refuses_more_frames_than_its_position_table(encoder_file):
    encoder = load_encoder(*encoder_file)
    with pytest.raises(ValueError, match="exceed"):
        encoder(torch.zeros(1, 2 * MAX_FRAMES + 2, N_MELS), torch.tensor([2 * MAX_FRAMES + 2]))


# --- Whisper's log-mel ----------------------------------------------------------------------

def librosa_whisper_mel(wave: np.ndarray) -> np.ndarray:
    """Whisper's log_mel_spectrogram written with librosa's STFT and filters: (frames, 80)."""
    librosa = pytest.importorskip("librosa")
    spectrum = librosa.stft(wave, n_fft=400, hop_length=160, window="hann", center=True,
                            pad_mode="reflect")[:, :-1]
    mel = librosa.filters.mel(sr=16_000, n_fft=400, n_mels=80) @ np.abs(spectrum) ** 2
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).T


def test_whisper_log_mel_equals_whispers_recipe_with_librosa():
    noise = (0.1 * np.random.default_rng(5).standard_normal(20_123)).astype(np.float32)
    for wave in (voiced_clip(1.7, seed=2), noise):
        ours = whisper_log_mel(wave)
        assert ours.dtype == np.float32 and ours.shape == (len(wave) // 160, 80)
        np.testing.assert_allclose(ours, librosa_whisper_mel(wave), atol=1e-4, rtol=0)


@pytest.mark.parametrize("samples", [1, 150, 199, 200, 201, 16_000, 16_159])
def test_whisper_log_mel_has_one_frame_per_hop_even_for_tiny_clips(samples):
    wave = voiced_clip(1.1, seed=1)[:samples]
    mel = whisper_log_mel(wave)
    assert mel.shape == (max(1, samples // 160), 80) and np.isfinite(mel).all()
