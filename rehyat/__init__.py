"""rehyat: Recurrent Hybrid Attention (ReHyAt, arXiv 2601.04342) for video diffusion transformers.

Layers, bottom up: ``rehyat.ops`` (stateless hybrid attention, reference, recurrent step), ``rehyat.modules``
(feature maps), ``rehyat.models`` (diffusers Wan integration: processor, conversion, recurrent runner),
``rehyat.pipelines`` (generation), ``rehyat.training`` (distillation, fine-tuning), ``rehyat.evaluation`` and
``rehyat.cli``. Heavy imports (diffusers) happen lazily.
"""

__version__ = "0.1.0"

from .ops import (  # noqa: E402
    RecurrentState,
    chunk_windows,
    rehyat_attention,
    rehyat_attention_recurrent,
    rehyat_attention_reference,
    rehyat_attention_step,
)

__all__ = [
    "RecurrentState", "chunk_windows", "rehyat_attention", "rehyat_attention_recurrent", "rehyat_attention_reference",
    "rehyat_attention_step", "convert_wan", "load_transformer", "save_rehyat", "ReHyAtConfig", "recurrent_forward",
]


def __getattr__(name):
    # Model-level API lives behind a lazy import so that `import rehyat` stays fast.
    if name in ("convert_wan", "load_transformer", "save_rehyat", "ReHyAtConfig", "recurrent_forward"):
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'rehyat' has no attribute {name!r}")
