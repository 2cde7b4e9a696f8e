"""Pool the lines of ``scripts/probes/checks_by_segment.py``: ``python scripts/probes/pool_checks.py SHORT.txt ...
-- LONG.txt ...``. For each TAG of the LONG files: the mean checks over its videos, the mean over the same
(prompt, seed) pairs in the SHORT files (the training length), and the share kept; then the mean shape score per
16-frame segment."""
import re
import sys

KEYS = ("colour_present", "shape_correct", "direction_correct", "persistence", "speed")


def read(files):
    out = {}
    for f in files:
        for line in open(f):
            if "colour_present" not in line or line.startswith("#"):
                continue
            tag, i, seed, frames = line.split()[:4]
            row = {k: float(re.search(k + r" (\S+)", line).group(1)) for k in KEYS}
            row["seg"] = [float(x) for x in line.split("| seg ")[1].split(" |")[0].split()]
            out[(tag, int(i), int(seed), int(frames))] = row
    return out


def mean(rows, k):
    return sum(r[k] for r in rows) / len(rows)


args = sys.argv[1:]
cut = args.index("--")
short = {(i, s): row for (_, i, s, _), row in read(args[:cut]).items()}
long = read(args[cut + 1:])
for tag in sorted({key[0] for key in long}):
    keys = sorted((i, s) for (t, i, s, _) in long if t == tag)
    rows = [row for (t, i, s, _), row in long.items() if t == tag]
    print(f"{tag}: {len(rows)} videos")
    print("  long: ", " ".join(f"{k} {mean(rows, k):.3f}" for k in KEYS))
    if all(k in short for k in keys):
        ref = [short[k] for k in keys]
        print("  short:", " ".join(f"{k} {mean(ref, k):.3f}" for k in KEYS))
        print("  kept: ", " ".join(f"{k} {100 * mean(rows, k) / mean(ref, k):.1f}%" for k in KEYS[:4]))
    segs = [r["seg"] for r in rows]
    print("  shape per segment:", " ".join(f"{sum(s[j] for s in segs) / len(segs):.2f}" for j in range(len(segs[0]))))
