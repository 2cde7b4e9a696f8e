"""Generation pipelines (parallel, recurrent, streaming) on diffusers' Wan components."""

from .video import MODES, GenerationOutput, NonFiniteOutputError, ReHyAtVideoPipeline, StreamingDecoder, initial_noise

__all__ = ["MODES", "GenerationOutput", "NonFiniteOutputError", "ReHyAtVideoPipeline", "StreamingDecoder", "initial_noise"]
