"""The metadata of emoloop's safetensors files: one entry holding sorted JSON.

safetensors writes its metadata map in no fixed order, so a file with several entries can come
out with different bytes (and sha256) for the same content. Every file we write (model versions,
personal heads, base sets, EWC states) keeps its metadata in this one entry instead.
"""
import json

import torch
from safetensors.torch import save as save_safetensors

METADATA_KEY = "emoloop"


def save_with_metadata(tensors: dict[str, torch.Tensor], metadata: dict) -> bytes:
    return save_safetensors(tensors, metadata={METADATA_KEY: json.dumps(metadata,
                                                                        sort_keys=True)})


def read_metadata(data: bytes) -> dict:
    """The metadata `save_with_metadata` wrote. Model and personal files written before it kept
    one entry per field: those read as that plain map. Raises ValueError for a broken header."""
    # safetensors layout: 8-byte little-endian header length, then a JSON header.
    header_len = int.from_bytes(data[:8], "little")
    if not 0 < header_len <= len(data) - 8:
        raise ValueError("not a safetensors file")
    metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    if METADATA_KEY in metadata:
        return json.loads(metadata[METADATA_KEY])
    return metadata
