"""Procedural scenes: one coloured shape moving on a plain background.

A :class:`Scene` describes a single object (circle, square or triangle) drawn in a
named palette colour on a background of another palette colour. The object moves
in a straight line at constant speed, and the frame is a torus: what leaves on the
right comes back on the left. The direction therefore never changes, so a scene
defines ground truth for a video of any length.

Coordinates follow image conventions: ``x`` grows to the right (columns) and
``y`` grows downwards (rows), so "up" means decreasing ``y``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np

#: Named RGB colours (uint8 values). Every pair is at least ~150 apart in RGB
#: Euclidean distance, so any two distinct names are clearly different.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 60, 230),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
}

#: Words accepted for a palette name when parsing captions.
COLOUR_SYNONYMS: dict[str, str] = {"gray": "grey"}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: Unit displacement (dx, dy) per direction, in image coordinates (y points down).
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}

#: Minimum RGB Euclidean distance between object and background colours.
MIN_CONTRAST = 140.0

#: Default object speed (pixels per frame) and size (fraction of the shorter side). At the embedded models' 40x40
#: frames and 4x4 patches the object spans 3.5-4.5 patches and moves 0.5-0.6 patch per frame: shape and motion are
#: not sub-patch detail (docs/results/embedded_models/TRAINING.md, "the world").
DEFAULT_SPEED_RANGE = (2.0, 2.5)
DEFAULT_SIZE_RANGE = (0.35, 0.45)
#: Default start position (bounding-box centre in frame 0, fraction of each side). Near the centre, so a caption
#: determines a video up to a few pixels: with positions uniform over the frame, the flow-matching loss barely
#: rewards the shape and direction words (a teacher trained so scored them at chance; TRAINING.md, "the world").
DEFAULT_POSITION_RANGE = (0.4, 0.6)
#: Largest allowed object size (fraction of the shorter frame side). Above half the
#: side, the wrapped copies of the object would overlap.
MAX_SIZE = 0.45


def colour_distance(a: str, b: str) -> float:
    """Euclidean RGB distance between two palette colours (0 to ~441)."""
    ca = np.array(PALETTE[a], dtype=np.float64)
    cb = np.array(PALETTE[b], dtype=np.float64)
    return float(np.linalg.norm(ca - cb))


@dataclass(frozen=True)
class Scene:
    """One object moving on a plain background, wrapping around the frame edges.

    Attributes:
        shape: ``"circle"``, ``"square"`` or ``"triangle"`` (an upward-pointing
            isosceles triangle whose base and height both equal ``size``).
        colour: palette name of the object (a key of :data:`PALETTE`).
        background: palette name of the background; must differ from ``colour``
            by at least :data:`MIN_CONTRAST`.
        direction: ``"left"``, ``"right"``, ``"up"`` or ``"down"``.
        speed: displacement in pixels per frame at the rendered resolution (> 0).
        size: side (square, triangle) or diameter (circle) as a fraction of the
            shorter frame side, in (0, :data:`MAX_SIZE`].
        x0: horizontal centre of the object's bounding box in frame 0, as a
            fraction of the frame width, in [0, 1).
        y0: vertical centre in frame 0, as a fraction of the frame height, in [0, 1).

    Raises:
        ValueError: on an unknown name, equal/low-contrast colours, or values out
            of range.
    """

    shape: str
    colour: str
    background: str
    direction: str
    speed: float
    size: float
    x0: float
    y0: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        for name in ("colour", "background"):
            value = getattr(self, name)
            if value not in PALETTE:
                raise ValueError(f"{name} must be one of {tuple(PALETTE)}, got {value!r}")
        if colour_distance(self.colour, self.background) < MIN_CONTRAST:
            raise ValueError(
                f"colour {self.colour!r} and background {self.background!r} are too similar"
            )
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {tuple(DIRECTIONS)}, got {self.direction!r}")
        if not (math.isfinite(self.speed) and self.speed > 0):
            raise ValueError(f"speed must be a positive finite number, got {self.speed!r}")
        if not (0 < self.size <= MAX_SIZE):
            raise ValueError(f"size must be in (0, {MAX_SIZE}], got {self.size!r}")
        for name in ("x0", "y0"):
            value = getattr(self, name)
            if not (0 <= value < 1):
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict of the fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        """Inverse of :meth:`to_dict` (extra keys are ignored)."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def centre(self, t: float, height: int, width: int) -> tuple[float, float]:
        """Bounding-box centre ``(x, y)`` in pixels at frame ``t``, wrapped into the frame."""
        dx, dy = DIRECTIONS[self.direction]
        x = (self.x0 * width + dx * self.speed * t) % width
        y = (self.y0 * height + dy * self.speed * t) % height
        return x, y


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def sample_scene(
    seed: int,
    *,
    shapes: Iterable[str] | None = None,
    colours: Iterable[str] | None = None,
    backgrounds: Iterable[str] | None = None,
    directions: Iterable[str] | None = None,
    speed_range: tuple[float, float] = DEFAULT_SPEED_RANGE,
    size_range: tuple[float, float] = DEFAULT_SIZE_RANGE,
    position_range: tuple[float, float] = DEFAULT_POSITION_RANGE,
) -> Scene:
    """Draw a random scene, deterministically from ``seed``.

    Uses its own ``numpy.random.default_rng(seed)``; the global RNG is untouched.

    Args:
        seed: non-negative integer seed.
        shapes, colours, backgrounds, directions: optional subsets of
            :data:`SHAPES`, :data:`PALETTE`, :data:`PALETTE`, :data:`DIRECTIONS` to
            draw from (default: all).
        speed_range: ``(low, high)`` pixels per frame, uniform. Default (2.0, 2.5).
        size_range: ``(low, high)`` fraction of the shorter side, uniform.
            Default (0.35, 0.45).
        position_range: ``(low, high)`` start position of the centre, fraction of each side in [0, 1],
            uniform. Default (0.4, 0.6).

    Returns:
        A :class:`Scene`. ``speed`` is rounded to 2 decimals, ``size``, ``x0`` and
        ``y0`` to 3, so captions and metadata stay readable.

    Raises:
        ValueError: if ``seed`` is negative, a subset is empty or has unknown
            names, a range is invalid, or no background in ``backgrounds``
            contrasts with the drawn colour.
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    shape_opts = _subset("shapes", shapes, SHAPES)
    colour_opts = _subset("colours", colours, tuple(PALETTE))
    bg_opts = _subset("backgrounds", backgrounds, tuple(PALETTE))
    dir_opts = _subset("directions", directions, tuple(DIRECTIONS))
    lo_speed, hi_speed = _range("speed_range", speed_range, 0.0, math.inf)
    lo_size, hi_size = _range("size_range", size_range, 0.0, MAX_SIZE)
    lo_pos, hi_pos = _range("position_range", position_range, -1e-9, 1.0)

    rng = np.random.default_rng(int(seed))
    shape = _pick(rng, shape_opts)
    colour = _pick(rng, colour_opts)
    allowed_bg = [b for b in bg_opts if colour_distance(colour, b) >= MIN_CONTRAST]
    if not allowed_bg:
        raise ValueError(f"backgrounds has no colour contrasting with {colour!r}")
    background = _pick(rng, allowed_bg)
    direction = _pick(rng, dir_opts)
    speed = round(float(rng.uniform(lo_speed, hi_speed)), 2)
    speed = max(speed, 0.01)
    size = round(float(rng.uniform(lo_size, hi_size)), 3)
    size = min(max(size, 0.001), MAX_SIZE)
    x0 = round(float(rng.uniform(lo_pos, hi_pos)), 3) % 1.0
    y0 = round(float(rng.uniform(lo_pos, hi_pos)), 3) % 1.0
    return Scene(shape, colour, background, direction, speed, size, x0, y0)


def _subset(name: str, values: Iterable[str] | None, allowed: tuple[str, ...]) -> list[str]:
    if values is None:
        return list(allowed)
    values = list(values)
    if not values:
        raise ValueError(f"{name} must not be empty")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"{name} has unknown values {unknown}; allowed: {allowed}")
    return values


def _range(name: str, r: tuple[float, float], lo: float, hi: float) -> tuple[float, float]:
    try:
        a, b = float(r[0]), float(r[1])
    except (TypeError, IndexError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair, got {r!r}") from None
    if not (lo < a <= b <= hi):
        raise ValueError(f"{name} must satisfy {lo} < low <= high <= {hi}, got {r!r}")
    return a, b


# ----------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------


def caption(scene: Scene) -> str:
    """Text prompt for a scene, e.g. ``"a red circle moving right on a grey background"``.

    Speed, size and position are not part of the caption.
    """
    return f"a {scene.colour} {scene.shape} moving {scene.direction} on a {scene.background} background"


_CAPTION_RE = re.compile(
    r"\b(?P<colour>[a-z]+)\s+(?P<shape>[a-z]+)\s+(?:is\s+)?moving\s+(?P<direction>[a-z]+)\b"
    r".*?\bon\s+(?:a|an|the)?\s*(?P<background>[a-z]+)\s+background\b"
)


def parse_caption(text: str) -> dict[str, str]:
    """Recover the prompted attributes from a caption made by :func:`caption`.

    Matching is case-insensitive and tolerant of extra words around the core
    phrase ``"<colour> <shape> moving <direction> ... on a <background> background"``;
    ``"gray"`` is read as ``"grey"``.

    Returns:
        ``{"shape": ..., "colour": ..., "background": ..., "direction": ...}``.

    Raises:
        ValueError: if the text does not follow that pattern or names an unknown
            shape, colour or direction.
    """
    if not isinstance(text, str):
        raise ValueError(f"caption must be a str, got {type(text).__name__}")
    m = _CAPTION_RE.search(text.lower())
    if m is None:
        raise ValueError(f"cannot parse caption {text!r}")
    attrs = {
        "shape": m.group("shape"),
        "colour": COLOUR_SYNONYMS.get(m.group("colour"), m.group("colour")),
        "background": COLOUR_SYNONYMS.get(m.group("background"), m.group("background")),
        "direction": m.group("direction"),
    }
    if attrs["shape"] not in SHAPES:
        raise ValueError(f"unknown shape {attrs['shape']!r} in caption {text!r}")
    for key in ("colour", "background"):
        if attrs[key] not in PALETTE:
            raise ValueError(f"unknown {key} {attrs[key]!r} in caption {text!r}")
    if attrs["direction"] not in DIRECTIONS:
        raise ValueError(f"unknown direction {attrs['direction']!r} in caption {text!r}")
    return attrs


# ----------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------


def _inside(shape: str, u: np.ndarray, v: np.ndarray, side: float) -> np.ndarray:
    """Boolean mask: points at offset (u, v) from the bounding-box centre lie in the shape."""
    h = side / 2.0
    if shape == "circle":
        return u * u + v * v <= h * h
    if shape == "square":
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    # Upward triangle: apex at (0, -h), base from (-h, h) to (h, h).
    return (v >= -h) & (v <= h) & (np.abs(u) <= (v + h) / 2.0)


def object_coverage(scene: Scene, t: float, height: int, width: int, antialias: int = 4) -> np.ndarray:
    """Fraction of each pixel covered by the object at frame ``t``.

    Each pixel is sampled on an ``antialias x antialias`` grid; offsets from the
    object centre are wrapped onto the torus so the object crosses edges smoothly.

    Returns:
        float32 array ``[height, width]`` with values in [0, 1].
    """
    s = int(antialias)
    cx, cy = scene.centre(t, height, width)
    side = scene.size * min(height, width)
    sub = (np.arange(s) + 0.5) / s
    xs = (np.arange(width)[:, None] + sub[None, :]).reshape(-1)  # [W*s]
    ys = (np.arange(height)[:, None] + sub[None, :]).reshape(-1)  # [H*s]
    u = (xs - cx + width / 2.0) % width - width / 2.0
    v = (ys - cy + height / 2.0) % height - height / 2.0
    inside = _inside(scene.shape, u[None, :], v[:, None], side)  # [H*s, W*s]
    cov = inside.reshape(height, s, width, s).mean(axis=(1, 3))
    return cov.astype(np.float32)


def render_frame(scene: Scene, t: float, height: int, width: int, antialias: int = 4) -> np.ndarray:
    """Render frame ``t`` of a scene.

    Returns:
        uint8 array ``[height, width, 3]`` (RGB).
    """
    cov = object_coverage(scene, t, height, width, antialias)[..., None]
    obj = np.array(PALETTE[scene.colour], dtype=np.float32)
    bg = np.array(PALETTE[scene.background], dtype=np.float32)
    img = bg * (1.0 - cov) + obj * cov
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_video(scene: Scene, num_frames: int, height: int, width: int, antialias: int = 4) -> np.ndarray:
    """Render a scene as a video; deterministic.

    Args:
        scene: the scene to draw.
        num_frames: number of frames F (>= 1).
        height, width: frame size in pixels (each >= 8).
        antialias: supersampling factor per axis (>= 1; 1 gives hard edges).
            Default 4.

    Returns:
        uint8 array ``[F, H, W, 3]`` (RGB).

    Raises:
        ValueError: naming the first invalid argument.
    """
    _check_int("num_frames", num_frames, 1)
    _check_int("height", height, 8)
    _check_int("width", width, 8)
    _check_int("antialias", antialias, 1)
    if not isinstance(scene, Scene):
        raise ValueError(f"scene must be a Scene, got {type(scene).__name__}")
    return np.stack([render_frame(scene, t, height, width, antialias) for t in range(num_frames)])


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
