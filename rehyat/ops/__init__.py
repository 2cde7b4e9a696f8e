"""Stateless ReHyAt operators: parallel form, dense reference, recurrent step (``rehyat.ops.hybrid``); the polynomial
feature map, reference and fused Triton kernel (``rehyat.ops.feature_map``)."""

from .feature_map import polynomial_feature_map, polynomial_feature_map_fused

from .mass import attention_mass, log_scale_for_mass
from .hybrid import (
    RecurrentState,
    chunk_windows,
    hybrid_masks,
    linear_norm_factor,
    rehyat_attention,
    rehyat_attention_recurrent,
    rehyat_attention_reference,
    rehyat_attention_step,
)

__all__ = [
    "attention_mass",
    "log_scale_for_mass",
    "polynomial_feature_map",
    "polynomial_feature_map_fused",
    "RecurrentState",
    "chunk_windows",
    "hybrid_masks",
    "linear_norm_factor",
    "rehyat_attention",
    "rehyat_attention_recurrent",
    "rehyat_attention_reference",
    "rehyat_attention_step",
]
