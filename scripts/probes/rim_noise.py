"""Shape classification of ground-truth world objects whose rim pixels (1-pixel inner and outer rim) flip with
probability p: the full-box classifier against the default (full and trimmed boxes). Args: side [side ...]."""
import numpy as np, sys
from rehyat.world import sample_scene
from rehyat.world.scenes import object_coverage
from rehyat.world.checks import classify_shape
def shift_or(m):
    p = np.pad(m, 1); h, w = m.shape
    return np.logical_or.reduce([p[i:i + h, j:j + w] for i in range(3) for j in range(3)])
for side in [int(a) for a in sys.argv[1:]]:
  for p in (0.0, 0.1, 0.2, 0.3):
    rng = np.random.default_rng(0)
    ok = {"full_box": {}, "default": {}}; n = 0
    for i in range(300):
        s = sample_scene(60_000 + i)
        cov = object_coverage(s, float(rng.integers(0, 16)), side, side) >= 0.5
        ys, xs = np.nonzero(cov)
        if ys.size == 0 or ys.max() - ys.min() > 0.75 * side or xs.max() - xs.min() > 0.75 * side:
            continue  # split across the frame's wrap-around (check_video rolls the frame first)
        m = np.pad(cov[ys.min():ys.max() + 1, xs.min():xs.max() + 1], 3)
        rim = shift_or(m) & shift_or(~m)
        m2 = m ^ (rim & (rng.random(m.shape) < p))
        yy, xx = np.nonzero(m2); crop = m2[yy.min():yy.max() + 1, xx.min():xx.max() + 1]
        n += 1
        for k, q in (("full_box", (0.0,)), ("default", (0.0, 0.01, 0.02))):
            d = ok[k].setdefault(s.shape, [0, 0]); d[0] += classify_shape(crop, trim_quantiles=q) == s.shape; d[1] += 1
    print(f"{side}x{side} p={p} n={n}", {k: {sh: round(a / b, 2) for sh, (a, b) in v.items()} for k, v in ok.items()})
