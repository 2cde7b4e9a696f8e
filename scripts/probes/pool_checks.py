"""Pool the lines of ``scripts/probes/checks_by_segment.py``: ``python scripts/probes/pool_checks.py FILE ... --short
TAG --long TAG[,TAG...]``. For each long TAG: the mean checks over its videos at its length, the mean over the same
(prompt, seed) pairs of the short TAG's videos at the shortest length in the files (the training length), the share
kept, and the mean shape score per 16-frame segment. Lines starting with ``#`` are skipped."""
import argparse
import re

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


p = argparse.ArgumentParser()
p.add_argument("files", nargs="+")
p.add_argument("--short", required=True, help="tag of the videos at the training length")
p.add_argument("--long", required=True, help="tags of the long videos, comma-separated")
a = p.parse_args()
rows = read(a.files)
short_frames = min(f for (t, _, _, f) in rows if t == a.short)
short = {(i, s): r for (t, i, s, f), r in rows.items() if t == a.short and f == short_frames}
for tag in a.long.split(","):
    mine = {(i, s): r for (t, i, s, f), r in rows.items() if t == tag and f > short_frames}
    print(f"{tag}: {len(mine)} videos")
    print("  long: ", " ".join(f"{k} {mean(list(mine.values()), k):.3f}" for k in KEYS))
    if all(key in short for key in mine):
        ref = [short[key] for key in mine]
        print("  short:", " ".join(f"{k} {mean(ref, k):.3f}" for k in KEYS))
        print("  kept: ", " ".join(f"{k} {100 * mean(list(mine.values()), k) / mean(ref, k):.1f}%" for k in KEYS[:4]))
    segs = [r["seg"] for r in mine.values()]
    print("  shape per segment:", " ".join(f"{sum(s[j] for s in segs) / len(segs):.2f}" for j in range(len(segs[0]))))
