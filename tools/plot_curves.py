"""Plot success rate against env steps from the metrics.csv files that rl4vlm.py writes.

    pip install matplotlib
    python tools/plot_curves.py runs/numberline-s1 runs/numberline-nocot-s1 --out docs/curves.png

Each run is one line: the success rate of the episodes that finished in each update's rollout,
smoothed over --window updates, with the evaluations before and after RL (results.json) as dots.
"""
import argparse
import csv
import json
import os
import sys


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders (each with metrics.csv)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--window", type=int, default=5, help="moving-average window, in updates")
    p.add_argument("--title", default=None)
    args = p.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_curves.py: error: needs matplotlib: pip install matplotlib")

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for run in args.runs:
        path = os.path.join(run, "metrics.csv")
        if not os.path.exists(path):
            sys.exit(f"plot_curves.py: error: no metrics.csv in {run}")
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if r["success"] != "nan"]
        steps = [int(r["env_steps"]) for r in rows]
        success = [float(r["success"]) for r in rows]
        smooth = [sum(success[max(0, i - args.window + 1):i + 1]) / len(success[max(0, i - args.window + 1):i + 1])
                  for i in range(len(success))]
        line, = ax.plot(steps, smooth, label=os.path.basename(os.path.normpath(run)))
        results = os.path.join(run, "results.json")
        if os.path.exists(results):
            with open(results) as f:
                res = json.load(f)
            if "start" in res and "final" in res and steps:
                ax.plot([0, steps[-1]], [res["start"]["success"], res["final"]["success"]], "o",
                        color=line.get_color())
    ax.set_xlabel("env steps")
    ax.set_ylabel("success rate (return > 0)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(args.title or "rollout success (line), evaluation before and after RL (dots)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
