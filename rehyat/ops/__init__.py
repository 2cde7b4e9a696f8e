"""Stateless ReHyAt operators: parallel form, dense reference, recurrent step (``rehyat.ops.hybrid``)."""

from .hybrid import (
    RecurrentState,
    chunk_windows,
    hybrid_masks,
    rehyat_attention,
    rehyat_attention_recurrent,
    rehyat_attention_reference,
    rehyat_attention_step,
)

__all__ = [
    "RecurrentState",
    "chunk_windows",
    "hybrid_masks",
    "rehyat_attention",
    "rehyat_attention_recurrent",
    "rehyat_attention_reference",
    "rehyat_attention_step",
]
