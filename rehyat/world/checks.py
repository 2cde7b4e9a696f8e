"""Ground-truth checks: does a video show what its scene or caption asks for?

Every pixel is assigned its nearest palette colour (RGB Euclidean distance), which
tolerates blur, noise and codec artefacts. In each frame the object is the largest
connected blob of the prompted colour, found on the torus (the frame is rolled so
that an empty row and column sit at the edges, and a blob crossing an edge is not
split). From the blobs we measure colour, shape, motion, persistence, background
and flicker. All checks are deterministic and need only numpy and scipy.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .scenes import DIRECTIONS, PALETTE, SHAPES, Scene, parse_caption

_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.array([PALETTE[n] for n in _PALETTE_NAMES], dtype=np.float32)  # [P, 3]


def _as_video(video: Any) -> np.ndarray:
    """Return float32 ``[F, H, W, 3]`` in 0..255 from uint8 (0..255) or float (0..1) input."""
    if hasattr(video, "detach"):  # torch tensor (bfloat16 has no numpy dtype)
        video = video.detach().cpu()
        video = (video.float() if video.is_floating_point() else video).numpy()
    arr = np.asarray(video)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise ValueError(f"video must have shape [F, H, W, 3] with F >= 1, got {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0
    raise ValueError(f"video must be uint8 (0..255) or float (0..1), got dtype {arr.dtype}")


def _target(scene_or_caption: Scene | str | Mapping[str, Any]) -> dict[str, str]:
    if isinstance(scene_or_caption, Scene):
        s = scene_or_caption
        return {"shape": s.shape, "colour": s.colour, "background": s.background, "direction": s.direction}
    if isinstance(scene_or_caption, str):
        return parse_caption(scene_or_caption)
    if isinstance(scene_or_caption, Mapping):
        try:
            t = {k: str(scene_or_caption[k]) for k in ("shape", "colour", "background", "direction")}
        except KeyError as e:
            raise ValueError(f"scene dict lacks key {e.args[0]!r}") from None
        if t["shape"] not in SHAPES or t["colour"] not in PALETTE or t["background"] not in PALETTE:
            raise ValueError(f"scene dict has unknown values: {t}")
        if t["direction"] not in DIRECTIONS:
            raise ValueError(f"scene dict has unknown direction: {t['direction']!r}")
        return t
    raise ValueError(f"scene_or_caption must be a Scene, caption str or dict, got {type(scene_or_caption).__name__}")


def palette_labels(frame: np.ndarray) -> np.ndarray:
    """Nearest palette colour of each pixel.

    Args:
        frame: float ``[H, W, 3]`` in 0..255.

    Returns:
        int64 ``[H, W]`` indices into ``tuple(PALETTE)``.
    """
    d = ((frame[:, :, None, :] - _PALETTE_RGB[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def _largest_blob(mask: np.ndarray) -> dict | None:
    """Largest 8-connected blob of a boolean ``[H, W]`` mask on the torus, or None if empty.

    Returns a dict: ``area`` (pixels), ``crop`` (bool mask cropped to the blob's
    bounding box, unsplit), ``cx``/``cy`` (centroid in pixels, wrapped into the
    frame) and ``mask`` (bool ``[H, W]`` in frame coordinates).
    """
    from scipy import ndimage

    if not mask.any():
        return None
    h, w = mask.shape
    # Put the emptiest row and column at the edges so a blob crossing an edge stays whole.
    r = int(np.argmin(mask.sum(1)))
    c = int(np.argmin(mask.sum(0)))
    rolled = np.roll(mask, (-r, -c), axis=(0, 1))
    labels, n = ndimage.label(rolled, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    k = int(np.argmax(sizes))
    ys, xs = np.nonzero(labels == k)
    blob = np.roll(labels == k, (r, c), axis=(0, 1))
    crop = labels[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] == k
    return {
        "area": int(ys.size),
        "crop": crop,
        "cy": float((ys.mean() + r) % h),
        "cx": float((xs.mean() + c) % w),
        "mask": blob,
    }


def _templates(h: int, w: int) -> dict[str, list[np.ndarray]]:
    """Ideal shapes inscribed in an ``h x w`` box, sampled at pixel centres.

    Curved and slanted shapes are also drawn 0.75 pixel larger than the box:
    pixels on their rim are less than half covered, so their blob's box is
    about a pixel smaller than the shape itself.
    """
    out: dict[str, list[np.ndarray]] = {"circle": [], "square": [np.ones((h, w), dtype=bool)], "triangle": []}
    for grow in (0.0, 0.75):
        u = ((np.arange(w) + 0.5) - w / 2.0)[None, :] / ((w + grow) / 2.0)
        v = ((np.arange(h) + 0.5) - h / 2.0)[:, None] / ((h + grow) / 2.0)
        out["circle"].append(u * u + v * v <= 1.0)
        # Any orientation counts as a triangle; scenes only draw the upward one.
        out["triangle"] += [
            np.abs(u) <= (v + 1.0) / 2.0,
            np.abs(u) <= (1.0 - v) / 2.0,
            np.abs(v) <= (u + 1.0) / 2.0,
            np.abs(v) <= (1.0 - u) / 2.0,
        ]
    return out


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """IoU of a blob with each ideal shape inscribed in the blob's bounding box.

    Args:
        mask: bool ``[h, w]``, the blob cropped to its bounding box (not split
            by wrap-around).

    Returns:
        ``{"circle": iou, "square": iou, "triangle": iou}``, each in [0, 1]. The
        square's IoU equals the bounding-box fill ratio (ideal values: circle
        0.785, triangle 0.5, square 1).
    """
    mask = np.asarray(mask, dtype=bool)
    scores = {}
    for name, variants in _templates(*mask.shape).items():
        best = 0.0
        for tpl in variants:
            union = np.logical_or(mask, tpl).sum()
            best = max(best, float(np.logical_and(mask, tpl).sum() / union) if union else 0.0)
        scores[name] = best
    return scores


def trim_blob(mask: np.ndarray, quantile: float = 0.02) -> np.ndarray:
    """A blob cropped to the box between the ``quantile`` and ``1 - quantile`` quantiles of its pixels' rows and columns.

    Generated objects often carry 1-2 pixel spurs on their rim; one spur widens the blob's full bounding box, so
    a square's fill ratio drops towards a circle's. The trimmed box ignores such outliers (a spur of a few pixels
    is under 2% of a 200-pixel object) while a clean shape loses at most a thin cap. :func:`classify_shape`
    scores each shape on the full and the trimmed boxes (scripts/probes/rim_noise.py: on 179 world objects at
    40x40 whose rim pixels flip with probability 0.1 / 0.2 / 0.3, squares are classified right 0.45 / 0.18 /
    0.29 of the time on the full box alone, 1.00 / 1.00 / 0.96 with the trimmed boxes; circles and triangles
    >= 0.97 either way; 1.00 for every shape without noise).

    Args:
        mask: bool ``[h, w]``, the blob cropped to its bounding box.
        quantile: fraction of the blob's pixels allowed outside the box on each side (default 0.02).

    Returns:
        bool ``[h', w']``, the part of ``mask`` inside the trimmed box.
    """
    if not 0.0 <= quantile < 0.5:
        raise ValueError(f"quantile must be in [0, 0.5), got {quantile!r}")
    mask = np.asarray(mask, dtype=bool)
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return mask
    y0, y1 = (int(round(v)) for v in np.quantile(ys, [quantile, 1 - quantile]))
    x0, x1 = (int(round(v)) for v in np.quantile(xs, [quantile, 1 - quantile]))
    return mask[y0:y1 + 1, x0:x1 + 1]


def classify_shape(mask: np.ndarray, min_iou: float = 0.5, trim_quantiles: Sequence[float] = (0.0, 0.01, 0.02)) -> str:
    """Classify a blob as ``"circle"``, ``"square"``, ``"triangle"`` or ``"other"``.

    The blob is compared with each ideal shape drawn in its own bounding box
    (:func:`shape_scores`) and the best IoU wins; sampling the templates on the
    same pixel grid makes this robust for small, aliased blobs where the plain
    fill ratio is not (an 8-pixel circle fills ~0.9 of its box). Each shape's
    score is its best over the full box and the boxes of :func:`trim_blob` at
    ``trim_quantiles``, so a spur on a generated object's rim does not turn a
    square into a circle while a clean shape keeps its full-box score.
    ``"other"`` if the box's aspect ratio is outside [0.6, 1/0.6] (no shape is
    elongated) or the best IoU is below ``min_iou`` (default 0.5).

    Args:
        mask: bool ``[h, w]``, the blob cropped to its bounding box.
        trim_quantiles: fractions of the blob's pixels :func:`trim_blob` may
            leave out on each side (default 0, 0.01, 0.02; ``(0.0,)``: the full
            box only).
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    if not mask.any() or not (0.6 <= w / h <= 1 / 0.6):
        return "other"
    scores: dict[str, float] = {}
    for q in trim_quantiles:
        for name, iou in shape_scores(trim_blob(mask, q) if q else mask).items():
            scores[name] = max(scores.get(name, 0.0), iou)
    best = max(scores, key=scores.get)
    return best if scores[best] >= min_iou else "other"


def _wrap(d: float, period: float) -> float:
    """Wrap a displacement into [-period/2, period/2)."""
    return (d + period / 2.0) % period - period / 2.0


def check_video(
    video: Any,
    scene_or_caption: Scene | str | Mapping[str, Any],
    *,
    min_area: float = 0.01,
    max_area: float = 0.35,
    max_jump: float = 0.1,
    min_speed: float = 0.1,
    margin: int = 2,
) -> dict[str, Any]:
    """Score a video against its scene or caption.

    Args:
        video: ``[F, H, W, 3]`` RGB, uint8 (0..255) or float (0..1); numpy array
            or torch tensor.
        scene_or_caption: a :class:`Scene`, a caption (see
            :func:`~rehyat.world.scenes.parse_caption`), or a dict with keys
            shape, colour, background, direction.
        min_area, max_area: plausible object area, as fractions of the frame.
            Defaults 0.01 and 0.35 (scenes cover about 0.03 to 0.13).
        max_jump: largest plausible centroid step between consecutive frames,
            as a fraction of the shorter side (scaled by the gap when frames in
            between lack the object). Default 0.1 (scenes move at most 2.5 px/frame).
        min_speed: mean speed (pixels/frame) below which no direction is
            reported. Default 0.1.
        margin: pixels around the object's blob excluded, with every pixel of
            the prompted colour, from the background measures (blur and
            anti-aliasing). Default 2.

    Returns:
        dict with float scores (higher is better unless noted):

        - ``colour_present``: fraction of frames with a blob of the prompted
          colour whose area is in [min_area, max_area] (the object is "present").
        - ``shape_correct``: fraction of present frames whose blob is classified
          (:func:`classify_shape`: best IoU with ideal shapes drawn in the
          blob's bounding box or in a box that leaves out spurs of up to 2% of
          its pixels) as the prompted shape; 0 if never present.
        - ``direction_correct``: 1.0 if the mean wrap-unwrapped centroid step
          over consecutive present frames points along the prompted axis and
          sign, else 0.0.
        - ``direction_consistency``: fraction of those steps with a positive
          component along the prompted direction.
        - ``speed``: the mean centroid step's component along the prompted
          direction, pixels per frame (negative: the wrong way; NaN without two
          consecutive present frames), to compare with the scene's speed
          (the world draws 2.0-2.5 px/frame by default).
        - ``persistence``: fraction of frames where the object is present, its
          area is within 0.5x..2x the median present area and it did not jump
          more than ``max_jump`` since the last present frame.
        - ``background_correct``: fraction of frames where at least half of the
          pixels away from the object have the prompted background colour.
        - ``background_fraction``: mean of that per-frame fraction.
        - ``flicker``: mean absolute difference of consecutive frames over
          pixels away from the object in both, in [0, 1] units (lower is
          better); NaN for a one-frame video.

        and diagnostics: ``shape_predicted`` (majority over present frames, or
        ``"none"``), ``direction_predicted`` (``"left"``/... or ``"none"``),
        ``mean_velocity`` (``[dx, dy]`` pixels/frame, y down), ``mean_area``
        (fraction of frame over present frames, NaN if never present),
        ``num_frames``.

    Raises:
        ValueError: bad video shape/dtype or unparseable target.
    """
    frames = _as_video(video)
    target = _target(scene_or_caption)
    n, h, w, _ = frames.shape
    blobs, away, bg_frac = _frame_blobs(frames, target, min_area=min_area, max_area=max_area, margin=margin)
    present = np.array([b is not None for b in blobs])
    shape_correct, shape_predicted = _shape_scores(blobs, target["shape"])
    vx, vy, direction_consistency, speed = _motion(blobs, target["direction"], h, w)
    direction_predicted = _direction_of(vx, vy, min_speed)
    persistence, mean_area = _persistence(blobs, h, w, max_jump=max_jump)
    return {
        "colour_present": float(present.mean()),
        "shape_correct": shape_correct,
        "direction_correct": float(direction_predicted == target["direction"]),
        "direction_consistency": direction_consistency,
        "speed": float(speed),
        "persistence": float(persistence),
        "background_correct": float(np.mean(bg_frac >= 0.5)),
        "background_fraction": float(bg_frac.mean()),
        "flicker": _flicker(frames, away),
        "shape_predicted": shape_predicted,
        "direction_predicted": direction_predicted,
        "mean_velocity": [vx, vy],
        "mean_area": mean_area,
        "num_frames": int(n),
    }


def _frame_blobs(
    frames: np.ndarray, target: Mapping[str, str], *, min_area: float, max_area: float, margin: int
) -> tuple[list[dict | None], list[np.ndarray], np.ndarray]:
    """Per frame of ``frames`` (float32 ``[F, H, W, 3]``): the object's blob, the pixels away from it, and the
    background fraction.

    Returns ``(blobs, away, bg_frac)``: ``blobs[t]`` is the largest blob of the target colour (see
    :func:`_largest_blob`) or None when absent or its area, as a fraction of the frame, is outside
    ``[min_area, max_area]``; ``away[t]`` is bool ``[H, W]``, pixels neither of the object colour nor within
    ``margin`` of the largest blob (its blurred or anti-aliased rim; kept even when the blob's area is out of
    range); ``bg_frac`` is float64 ``[F]``, the fraction of away pixels of the background colour (0 if none).
    """
    from scipy import ndimage

    n, h, w, _ = frames.shape
    obj_idx = _PALETTE_NAMES.index(target["colour"])
    bg_idx = _PALETTE_NAMES.index(target["background"])
    total = float(h * w)
    blobs: list[dict | None] = []
    away: list[np.ndarray] = []
    bg_frac = np.zeros(n)
    for t in range(n):
        labels = palette_labels(frames[t])
        obj = labels == obj_idx
        blob = _largest_blob(obj)
        near = obj.copy()
        if blob is not None:
            near |= ndimage.maximum_filter(blob["mask"].astype(np.uint8), size=2 * margin + 1, mode="wrap") > 0
        far = ~near
        if blob is not None and not (min_area <= blob["area"] / total <= max_area):
            blob = None
        blobs.append(blob)
        away.append(far)
        bg_frac[t] = (labels[far] == bg_idx).mean() if far.any() else 0.0
    return blobs, away, bg_frac


def _shape_scores(blobs: Sequence[dict | None], shape: str) -> tuple[float, str]:
    """``(shape_correct, shape_predicted)`` of :func:`check_video` over the present frames' blobs."""
    shapes = [classify_shape(b["crop"]) for b in blobs if b is not None]
    shape_correct = float(np.mean([s == shape for s in shapes])) if shapes else 0.0
    shape_predicted = Counter(shapes).most_common(1)[0][0] if shapes else "none"
    return shape_correct, shape_predicted


def _motion(blobs: Sequence[dict | None], direction: str, h: int, w: int) -> tuple[float, float, float, float]:
    """``(vx, vy, direction_consistency, speed)`` of :func:`check_video` from the wrap-unwrapped centroid steps
    between consecutive present frames (0, 0, 0 and NaN without such a pair)."""
    steps = []
    for t in range(1, len(blobs)):
        a, b = blobs[t - 1], blobs[t]
        if a is not None and b is not None:
            steps.append((_wrap(b["cx"] - a["cx"], w), _wrap(b["cy"] - a["cy"], h)))
    tx, ty = DIRECTIONS[direction]
    if not steps:
        return 0.0, 0.0, 0.0, float("nan")
    st = np.array(steps)
    vx, vy = float(st[:, 0].mean()), float(st[:, 1].mean())
    direction_consistency = float(np.mean(st[:, 0] * tx + st[:, 1] * ty > 0))
    return vx, vy, direction_consistency, vx * tx + vy * ty


def _persistence(blobs: Sequence[dict | None], h: int, w: int, *, max_jump: float) -> tuple[float, float]:
    """``(persistence, mean_area)`` of :func:`check_video`: the fraction of frames whose object is present, of
    stable size (0.5x..2x the median present area) and did not teleport (centroid jump at most
    ``max_jump * min(h, w)`` per frame since the last present frame); the mean present area as a fraction of
    the frame. ``(0.0, nan)`` if the object is never present."""
    areas = np.array([b["area"] for b in blobs if b is not None], dtype=np.float64)
    if not len(areas):
        return 0.0, float("nan")
    median_area = float(np.median(areas))
    limit = max_jump * min(h, w)
    ok = 0
    last_t, last = None, None
    for t, b in enumerate(blobs):
        if b is None:
            continue
        good = 0.5 * median_area <= b["area"] <= 2.0 * median_area
        if last is not None:
            jump = math.hypot(_wrap(b["cx"] - last["cx"], w), _wrap(b["cy"] - last["cy"], h))
            good = good and jump <= limit * (t - last_t)
        ok += int(good)
        last_t, last = t, b
    return ok / len(blobs), float(areas.mean() / float(h * w))


def _flicker(frames: np.ndarray, away: Sequence[np.ndarray]) -> float:
    """Mean absolute difference of consecutive frames over pixels away from the object in both, in [0, 1]
    units; NaN when no pair of frames has such a pixel."""
    diffs = []
    for t in range(1, len(frames)):
        m = away[t - 1] & away[t]
        if m.any():
            diffs.append(float(np.abs(frames[t][m] - frames[t - 1][m]).mean() / 255.0))
    return float(np.mean(diffs)) if diffs else float("nan")


def _direction_of(vx: float, vy: float, min_speed: float) -> str:
    if max(abs(vx), abs(vy)) < min_speed:
        return "none"
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def summarise(results: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Average the numeric scores of several :func:`check_video` results.

    Non-numeric entries (predicted labels, velocity lists) are skipped; NaNs
    are ignored (a key that is NaN everywhere averages to NaN).

    Returns:
        ``{key: mean}`` for every numeric key, plus ``"num_videos"``.

    Raises:
        ValueError: if ``results`` is empty.
    """
    results = list(results)
    if not results:
        raise ValueError("results must not be empty")
    values: dict[str, list[float]] = {}
    for r in results:
        for k, v in r.items():
            if isinstance(v, (bool, int, float, np.floating, np.integer)) and k != "num_frames":
                values.setdefault(k, []).append(float(v))
    out = {}
    for k, vs in values.items():
        arr = np.array(vs, dtype=np.float64)
        finite = arr[~np.isnan(arr)]
        out[k] = float(finite.mean()) if finite.size else float("nan")
    out["num_videos"] = len(results)
    return out
