"""Model integration: diffusers Wan processors, conversion, save/load (``wan``) and the recurrent runner."""

from .compile import COMPILE_CHOICES, check_compile, compile_blocks, should_compile
from .runner import TransformerState, check_recurrent, forward_chunk, recurrent_forward
from .wan import (
    ChunkCausalAttnProcessor,
    ReHyAtAttnProcessor,
    ReHyAtConfig,
    RunContext,
    convert_wan,
    distill_mode,
    get_context,
    get_rehyat_config,
    load_transformer,
    read_rehyat_settings,
    recurrent_mode,
    runner_chunk_frames,
    save_rehyat,
    set_linear_norm_frames,
)

__all__ = [
    "COMPILE_CHOICES", "ChunkCausalAttnProcessor", "ReHyAtAttnProcessor", "ReHyAtConfig", "RunContext",
    "TransformerState", "check_compile", "check_recurrent", "compile_blocks", "convert_wan", "distill_mode",
    "forward_chunk", "get_context", "get_rehyat_config", "load_transformer", "read_rehyat_settings",
    "recurrent_forward", "recurrent_mode", "runner_chunk_frames", "save_rehyat", "set_linear_norm_frames",
    "should_compile",
]
