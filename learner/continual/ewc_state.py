"""The EWC state one round hands to the next, as plain tensors in a safetensors file.

Online EWC keeps one importance per parameter (decayed and summed over rounds) and the weights
it anchors to (the version the next round starts from). Both live in Avalanche's EWCPlugin only
while a round runs; between rounds they are this file, stored beside the model version it
belongs to. Never a pickled strategy: the file holds named float tensors and nothing else, so it
loads safely and does not depend on Avalanche's classes.
"""
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors

from learner.file_metadata import read_metadata, save_with_metadata
from storage.files import sha256_bytes

STATE_FORMAT = "emoloop-ewc-v1"
_IMPORTANCE, _ANCHOR = "importance/", "anchor/"


class StateFileError(RuntimeError):
    """A state file that is corrupt or not one of ours."""


@dataclass(frozen=True)
class EwcState:
    """Per parameter name (MaskedInputNet's names): its importance and its anchor value.
    `rounds` counts the rounds whose importances were folded in (0: computed at bootstrap)."""

    importances: dict[str, torch.Tensor]
    anchor: dict[str, torch.Tensor]
    rounds: int = 0

    def to_bytes(self) -> bytes:
        if self.importances.keys() != self.anchor.keys():
            raise ValueError("importances and anchor must name the same parameters")
        tensors = {**{_IMPORTANCE + k: v.detach().float().contiguous().cpu()
                      for k, v in self.importances.items()},
                   **{_ANCHOR + k: v.detach().float().contiguous().cpu()
                      for k, v in self.anchor.items()}}
        # The parameter order matters to Avalanche's online update (it zips old and new
        # importances in the model's order), and safetensors sorts names: keep it explicitly.
        info = {"format": STATE_FORMAT, "order": list(self.importances), "rounds": self.rounds}
        return save_with_metadata(tensors, info)

    @classmethod
    def from_bytes(cls, data: bytes, expected_sha256: str | None = None) -> "EwcState":
        if expected_sha256 is not None and sha256_bytes(data) != expected_sha256:
            raise StateFileError("EWC state file does not match its recorded sha256")
        try:
            info = read_metadata(data)
            if info.get("format") != STATE_FORMAT:
                raise StateFileError(f"not an EWC state file (format {info.get('format')!r})")
            tensors = load_safetensors(data)
            return cls(importances={k: tensors[_IMPORTANCE + k] for k in info["order"]},
                       anchor={k: tensors[_ANCHOR + k] for k in info["order"]},
                       rounds=int(info.get("rounds", 0)))
        except StateFileError:
            raise
        except Exception as err:  # any parse or key error: the file is not usable
            raise StateFileError(f"unreadable EWC state file: {err}") from err
