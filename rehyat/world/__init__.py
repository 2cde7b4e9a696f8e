"""A small procedural video world with ground truth for videos of any length.

Scenes are one coloured shape moving at constant speed on a plain background,
wrapping around the frame edges (see :mod:`rehyat.world.scenes`). Videos can be
exported as an mp4 + ``metadata.jsonl`` folder (:mod:`rehyat.world.dataset`) and
any video, e.g. a generated one, can be scored against its caption
(:mod:`rehyat.world.checks`).
"""

from .checks import check_video, classify_shape, shape_scores, summarise, trim_blob
from .dataset import export_video_dataset, read_metadata, read_video, scene_seed, write_video
from .scenes import (
    DIRECTIONS,
    PALETTE,
    SHAPES,
    Scene,
    caption,
    parse_caption,
    render_frame,
    render_video,
    sample_scene,
)

__all__ = [
    "DIRECTIONS",
    "PALETTE",
    "SHAPES",
    "Scene",
    "caption",
    "check_video",
    "classify_shape",
    "trim_blob",
    "export_video_dataset",
    "parse_caption",
    "read_metadata",
    "read_video",
    "render_frame",
    "render_video",
    "sample_scene",
    "scene_seed",
    "shape_scores",
    "summarise",
    "write_video",
]
