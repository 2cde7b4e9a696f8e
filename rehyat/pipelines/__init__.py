"""Generation pipelines (parallel, recurrent, streaming) on diffusers' Wan components."""

from .video import MODES, GenerationOutput, NonFiniteOutputError, ReHyAtVideoPipeline, StreamingDecoder, initial_noise
from .schedule import plan_prompt_schedule, read_prompt_schedule  # noqa: E402  (after .video, which it imports)

__all__ = ["MODES", "GenerationOutput", "NonFiniteOutputError", "ReHyAtVideoPipeline", "StreamingDecoder", "initial_noise",
           "plan_prompt_schedule", "read_prompt_schedule"]
