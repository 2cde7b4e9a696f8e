"""Learned feature maps ``phi`` for the linear branch of ReHyAt attention (design section 4).

Both maps act per head with per-head weights stored as batched tensors (``[H, ...]``, one ``einsum`` for all heads,
no Python loop over heads). Input ``x`` is ``[..., H, D]`` (e.g. ``[B, N, H, D]``, the diffusers layout); output is
``[..., H, D']`` in float32 for float32 weights (float64 when the weights or the input are float64), in bfloat16 for
bfloat16 weights (a model cast to bfloat16 for inference: the positivity transform and the powers are still computed
in float32, then rounded once), and in float32 for float16 weights: powers of softplus outputs (and Hedgehog's
scale) leave float16's range (max 65504) long before float32's, so float16 features are never returned (design
section 3, precision). :func:`rehyat.ops.rehyat_attention` runs its linear products in bfloat16 on tensor cores when
q and the features are both bfloat16, in float32 otherwise, and sums across frames in float32 either way.

Positivity: every output entry is non-negative, so the kernel ``phi_q(q) . phi_k(k)`` is non-negative, the linear
mass in the joint denominator is >= 0, and the denominator is >= the softmax mass (1 with the ``"lse"``
stabiliser): it can neither vanish nor change sign, whatever the norm of q and k. The operator's own clamp of the
linear mass (see :mod:`rehyat.ops.hybrid`) is then an exact no-op and stays only as a guard for other maps.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops.feature_map import POSITIVITY as _POSITIVITY
from ..ops.feature_map import compute_dtype as _compute_dtype
from ..ops.feature_map import fused_feature_map_supports, polynomial_feature_map, polynomial_feature_map_fused
from ..ops.feature_map import result_dtype as _result_dtype
from ..ops.feature_map import work_dtype as _out_dtype

__all__ = ["PolynomialFeatureMap", "HedgehogFeatureMap", "make_feature_map", "set_fused_feature_maps", "FEATURE_MAPS"]


def _check_input(x: torch.Tensor, num_heads: int, head_dim: int) -> None:
    if x.dim() < 2 or x.shape[-2] != num_heads or x.shape[-1] != head_dim:
        raise ValueError(f"x must have shape [..., H={num_heads}, D={head_dim}], got {tuple(x.shape)}")


class PolynomialFeatureMap(nn.Module):
    """The paper's feature map: a per-head 2-layer MLP whose output is split into P parts raised to powers 1..P.

    ``phi(x) = [g(u_1), g(u_2)^2, ..., g(u_P)^P]`` with ``u = W2 act(W1 x + b1) + b2`` per head, ``u`` split into
    ``P`` equal parts of ``feature_dim / P`` entries, and ``g`` a positivity transform (default ``softplus``). The
    paper (ReHyAt, section 3.3) uses powers 1..P of MLP outputs; the positivity transform is this library's
    choice: it keeps the kernel non-negative (see the module docstring) and, unlike ``exp``, cannot overflow in
    bfloat16 for large-norm inputs.

    Args:
        num_heads: H.
        head_dim: D, the input width per head (128 for Wan2.1).
        feature_dim: D', output width per head; default ``2 * head_dim`` (256 at D = 128). Must be divisible by
            ``degree``.
        hidden_dim: MLP hidden width per head; default ``feature_dim``.
        degree: P >= 1, default 2.
        positivity: ``"softplus"`` (default), ``"exp"`` or ``"relu"``.

    Parameters: ``w1 [H, D, hidden]``, ``b1 [H, hidden]``, ``w2 [H, hidden, D']``, ``b2 [H, D']``; at H = 12,
    D = 128: 1,185,792 (about 1.2M, the paper's count).

    Shapes: ``forward(x [..., H, D]) -> [..., H, D']`` float32 (float64 for float64 weights or input, bfloat16 for
    bfloat16 weights; float32 for float16 weights, see the module docstring).

    Paths: the math is :func:`rehyat.ops.feature_map.polynomial_feature_map` (plain PyTorch, autograd). For
    inference on a CUDA device with the input and weights both bfloat16 (or float16) and power-of-two widths
    from 16 to 256 (Wan2.1: D = 128, D' = hidden = 256), ``forward`` runs the fused Triton kernel
    :func:`rehyat.ops.feature_map.polynomial_feature_map_fused` instead (same function, one pass over memory);
    set the attribute ``fused = False`` (or :func:`set_fused_feature_maps`) to force the reference.

    Raises:
        ValueError: on non-positive sizes, ``feature_dim`` not divisible by ``degree``, an unknown
            ``positivity``, or an input whose last two dims are not ``(H, D)``.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        feature_dim: int | None = None,
        hidden_dim: int | None = None,
        degree: int = 2,
        positivity: str = "softplus",
    ) -> None:
        super().__init__()
        feature_dim = 2 * head_dim if feature_dim is None else feature_dim
        hidden_dim = feature_dim if hidden_dim is None else hidden_dim
        for name, val in (("num_heads", num_heads), ("head_dim", head_dim), ("feature_dim", feature_dim),
                          ("hidden_dim", hidden_dim), ("degree", degree)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if feature_dim % degree != 0:
            raise ValueError(f"feature_dim ({feature_dim}) must be divisible by degree ({degree})")
        if positivity not in _POSITIVITY:
            raise ValueError(f"positivity must be one of {sorted(_POSITIVITY)}, got {positivity!r}")
        self.num_heads, self.head_dim, self.feature_dim = num_heads, head_dim, feature_dim
        self.hidden_dim, self.degree, self.positivity = hidden_dim, degree, positivity
        self.fused = True
        self.w1 = nn.Parameter(torch.empty(num_heads, head_dim, hidden_dim))
        self.b1 = nn.Parameter(torch.empty(num_heads, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_heads, hidden_dim, feature_dim))
        self.b2 = nn.Parameter(torch.empty(num_heads, feature_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, per head: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.num_heads, self.head_dim)
        args = (x, self.w1, self.b1, self.w2, self.b2)
        kw = dict(degree=self.degree, positivity=self.positivity)
        # getattr: a whole module pickled before the attribute existed loads without it
        if getattr(self, "fused", True) and fused_feature_map_supports(*args, self.degree):
            return polynomial_feature_map_fused(*args, **kw)
        return polynomial_feature_map(*args, **kw)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, hidden_dim={self.hidden_dim}, "
                f"feature_dim={self.feature_dim}, degree={self.degree}, positivity={self.positivity!r}")


class HedgehogFeatureMap(nn.Module):
    """Hedgehog-style feature map (Zhang et al., 2024): ``phi(x) = s_h * [softmax(W x), softmax(-W x)]`` per head.

    One per-head linear map ``W [H, D, D'/2]`` initialised to the identity (truncated or zero-padded when
    ``D'/2 != D``), a softmax over each half, and a learned per-head scale ``s_h = exp(log_scale_h)`` (init 1).
    The scale is this library's addition: inside the hybrid the linear mass competes with the softmax mass, so
    its overall size must be learnable, which a per-token softmax alone fixes.

    Args:
        num_heads: H. head_dim: D. feature_dim: D', even, default ``2 * head_dim``.

    Shapes: ``forward(x [..., H, D]) -> [..., H, D']`` float32 (float64 for float64 weights or input, bfloat16 for
    bfloat16 weights; float32 for float16 weights, see the module docstring).
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None) -> None:
        super().__init__()
        feature_dim = 2 * head_dim if feature_dim is None else feature_dim
        for name, val in (("num_heads", num_heads), ("head_dim", head_dim), ("feature_dim", feature_dim)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if feature_dim % 2 != 0:
            raise ValueError(f"feature_dim must be even, got {feature_dim}")
        self.num_heads, self.head_dim, self.feature_dim = num_heads, head_dim, feature_dim
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim // 2))
        self.log_scale = nn.Parameter(torch.zeros(num_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity initialisation per head (Hedgehog's choice), log-scale 0."""
        with torch.no_grad():
            eye = torch.eye(self.head_dim, self.feature_dim // 2)
            self.weight.copy_(eye.expand(self.num_heads, -1, -1))
            self.log_scale.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.num_heads, self.head_dim)
        cdt = _compute_dtype(x, self.weight)
        u = torch.einsum("...hd,hdf->...hf", x.to(cdt), self.weight.to(cdt))
        u = u.to(_out_dtype(u.dtype))
        phi = torch.cat([u.softmax(dim=-1), (-u).softmax(dim=-1)], dim=-1)
        phi = phi * self.log_scale.to(phi.dtype).exp()[:, None]  # exp in the working dtype: e^12 > float16's max
        return phi.to(_result_dtype(cdt, phi.dtype))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}"


def set_fused_feature_maps(module: nn.Module, enabled: bool) -> int:
    """Turn the fused Triton path of every :class:`PolynomialFeatureMap` inside ``module`` on or off.

    The fused path is on by default and is only taken where it applies (CUDA, 16-bit, no gradient); turning it off
    forces the reference everywhere (for A/B timing or debugging). Returns the number of feature maps changed.
    """
    n = 0
    for m in module.modules():
        if isinstance(m, PolynomialFeatureMap):
            m.fused = bool(enabled)
            n += 1
    return n


FEATURE_MAPS = {"polynomial": PolynomialFeatureMap, "hedgehog": HedgehogFeatureMap}


def make_feature_map(kind: str, num_heads: int, head_dim: int, **kwargs) -> nn.Module:
    """Build a feature map by name: ``"polynomial"`` (default of the library) or ``"hedgehog"``.

    ``kwargs`` go to the class (``feature_dim``, and for ``"polynomial"`` also ``hidden_dim``, ``degree``,
    ``positivity``). Raises ``ValueError`` for an unknown ``kind``.
    """
    if kind not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {kind!r}")
    return FEATURE_MAPS[kind](num_heads, head_dim, **kwargs)
