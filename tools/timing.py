"""Where a run's RL time went, from the t_* and sps columns of the metrics.csv that rl4vlm.py writes.

    python tools/timing.py runs/numberline-s1

Prints the split of RL time (prompt building and image processing, generate, parsing and scoring,
env steps, PPO update), the share of rollout time spent outside the bare generate calls, and the
mean env steps per second.
"""
import argparse
import csv
import os
import sys

PARTS = ["prompt", "generate", "score", "env", "update"]

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder (with metrics.csv)")
    args = p.parse_args()
    path = os.path.join(args.run, "metrics.csv")
    if not os.path.exists(path):
        sys.exit(f"timing.py: error: no metrics.csv in {args.run}")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    seconds = {k: sum(float(r[f"t_{k}"]) for r in rows) for k in PARTS}
    total = sum(seconds.values())
    rollout = total - seconds["update"]
    print(f"{len(rows)} updates, {total:.0f} s of RL: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in seconds.items()))
    print(f"rollout time beyond the bare generate calls: {100 * (rollout - seconds['generate']) / rollout:.1f}%")
    print(f"env steps per second: {sum(float(r['sps']) for r in rows) / len(rows):.1f} (mean over updates)")
