"""A reader for CTranslate2's model file (binary format version 6), written from its layout:

    u32 version (6) | str spec name | u32 revision | u32 n_variables
    n_variables x (str name | u8 rank | rank x u32 dims | u8 dtype | u32 n_bytes | bytes)
    u32 n_aliases | n_aliases x (str alias | str target)

where `str` is a u16 length (counting a trailing NUL), the UTF-8 bytes and the NUL; all integers
little-endian. Only what the encoder needs is ever turned into arrays: `names` alone walks the
headers without copying a tensor.
"""
import struct
from pathlib import Path

import numpy as np

SUPPORTED_VERSION = 6
# CTranslate2's DataType enum, in its order.
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


class CT2FormatError(ValueError):
    """A file that is not a CTranslate2 model file this reader understands."""


class _Cursor:
    def __init__(self, data: bytes):
        self.data, self.offset = memoryview(data), 0

    def take(self, n: int) -> memoryview:
        if self.offset + n > len(self.data):
            raise CT2FormatError("file ends in the middle of a record (truncated?)")
        chunk = self.data[self.offset : self.offset + n]
        self.offset += n
        return chunk

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        n = self.unpack("H")
        raw = bytes(self.take(n))
        if n == 0 or raw[-1] != 0:
            raise CT2FormatError("malformed string record")
        return raw[:-1].decode("utf-8")


def read_ct2(data: bytes, wanted=lambda name: True) -> tuple[str, dict[str, np.ndarray]]:
    """-> (spec name, {variable name: array}) for the variables `wanted(name)` accepts.
    Arrays are copies, so `data` can be freed; scalars come back as 0-d arrays."""
    cursor = _Cursor(data)
    version = cursor.unpack("I")
    if version != SUPPORTED_VERSION:
        raise CT2FormatError(f"CTranslate2 binary version {version}; this reader reads "
                             f"version {SUPPORTED_VERSION}")
    spec = cursor.string()
    cursor.unpack("I")  # the spec's revision: the variable names say all we need
    variables = {}
    for _ in range(cursor.unpack("I")):
        name = cursor.string()
        shape = tuple(cursor.unpack("I") for _ in range(cursor.unpack("B")))
        dtype_id, n_bytes = cursor.unpack("B"), cursor.unpack("I")
        raw = cursor.take(n_bytes)
        if not wanted(name):
            continue
        if dtype_id not in _DTYPES:
            raise CT2FormatError(f"{name}: data type {dtype_id} is not supported")
        dtype = np.dtype(_DTYPES[dtype_id])
        if n_bytes != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise CT2FormatError(f"{name}: {n_bytes} bytes do not hold {shape} of {dtype}")
        variables[name] = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    return spec, variables


def read_ct2_file(path: Path, wanted=lambda name: True) -> tuple[str, dict[str, np.ndarray]]:
    return read_ct2(Path(path).read_bytes(), wanted)


def write_ct2(spec: str, variables: dict[str, np.ndarray]) -> bytes:
    """The inverse of `read_ct2` (no aliases): the tests build small files with it."""
    ids = {np.dtype(t): i for i, t in _DTYPES.items()}

    def string(s: str) -> bytes:
        raw = s.encode("utf-8") + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = [struct.pack("<I", SUPPORTED_VERSION), string(spec), struct.pack("<II", 1, len(variables))]
    for name, array in variables.items():
        array = np.asarray(array, order="C")  # ascontiguousarray would make a scalar 1-d
        out += [string(name), struct.pack("<B", array.ndim),
                b"".join(struct.pack("<I", d) for d in array.shape),
                struct.pack("<BI", ids[array.dtype], array.nbytes), array.tobytes()]
    out.append(struct.pack("<I", 0))
    return b"".join(out)
