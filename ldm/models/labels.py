"""Class-conditional and unconditional models (the latent diffusion paper's other tasks): the UNet cross-attends to
one learned token per class label instead of a caption's hidden states.

:class:`LabelEncoder` holds one learned vector per class and one more, the *null* label: the context of the
unconditional half of classifier-free guidance, of captions dropped in training, and the only one an unconditional
model has. A class model's "prompt" is its class name ("" is the null label), so the sampling loop, the CLI and the
PNG metadata treat it as they treat text.
"""

from __future__ import annotations

import difflib
import enum

import torch
from torch import nn

from ldm.errors import LdmError
from ldm.models.text_encoder import TextEncoding


class Conditioning(enum.Enum):
    """What the UNet's cross-attention reads."""

    TEXT = "text"  # a caption's hidden states from the text encoder
    CLASS = "class"  # one learned token per class label
    NONE = "none"  # one learned token, always: an unconditional model


class LabelEncoder(nn.Module):
    """Class names → :class:`~ldm.models.text_encoder.TextEncoding` of one token, (B, 1, D). ``self.model`` holds the
    weights that are saved (``weight``: (classes + 1, D), the last row the null label)."""

    def __init__(self, classes: tuple[str, ...], width: int):
        super().__init__()
        self.classes = tuple(classes)
        self.model = nn.Embedding(len(self.classes) + 1, width)
        nn.init.normal_(self.model.weight, std=width**-0.5)

    @property
    def null(self) -> int:
        return len(self.classes)

    def labels(self, names: list[str]) -> torch.Tensor:
        """(B,) label ids of ``names`` ("" → the null label); an unknown name is an error naming the classes."""
        return torch.tensor(label_ids(self.classes, names), dtype=torch.long)

    def forward(self, labels: torch.Tensor) -> TextEncoding:  # (B,) → (B, 1, D)
        vectors = self.model(labels.to(self.model.weight.device))  # (B, D)
        return TextEncoding(hidden_states=vectors[:, None], pooled=vectors)


def label_ids(classes: tuple[str, ...], names: list[str]) -> list[int]:
    """The label ids of ``names`` among ``classes`` ("" → the null label, ``len(classes)``), checked without a
    model: an unknown name is an error naming the close matches and the classes."""
    index = {name: i for i, name in enumerate(classes)}
    ids = []
    for name in names:
        if name == "":
            ids.append(len(classes))
        elif name in index:
            ids.append(index[name])
        elif not classes:
            raise LdmError(f"this model is unconditional: it takes no prompt or class, got {name!r}; leave it out")
        else:
            close = difflib.get_close_matches(name, classes, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}" if close else ""
            shown = ", ".join(classes[:20]) + (" …" if len(classes) > 20 else "")
            raise LdmError(f"unknown class {name!r}{hint}; the model's classes are: {shown}")
    return ids


def build_label_encoder(classes: tuple[str, ...], width: int) -> LabelEncoder:
    return LabelEncoder(classes, width)
