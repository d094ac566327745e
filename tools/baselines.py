"""Success rates of the random and the expert policy on the evaluation seeds of rl4vlm.py.

    python tools/baselines.py --episodes 2000

The random policy is the floor of the results table (a uniformly random legal action every step);
the expert (envs.py's expert_action: exact solver, DP-optimal Blackjack) is the ceiling.
"""
import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402

EVAL_SEED = 1_000_000  # rl4vlm.EVAL_SEED: episode j of an evaluation is reset(seed=EVAL_SEED + j)


def success_rate(task, policy, episodes):
    env, rng, wins = envs.make(task, image_size=56), random.Random(0), 0
    for j in range(episodes):
        env.reset(seed=EVAL_SEED + j)
        total, done = 0.0, False
        while not done:
            a = env.expert_action() if policy == "expert" else rng.randrange(len(env.action_names))
            _, r, terminated, truncated, _ = env.step(a)
            total, done = total + r, terminated or truncated
        wins += total > 0
    return wins / episodes


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=2000)
    args = p.parse_args()
    print(f"success rate over {args.episodes} episodes (seeds {EVAL_SEED}..{EVAL_SEED + args.episodes - 1})")
    print(f"{'policy':8s} " + " ".join(f"{t:>10s}" for t in envs.TASKS))
    for policy in ("random", "expert"):
        rates = [success_rate(t, policy, args.episodes) for t in envs.TASKS]
        print(f"{policy:8s} " + " ".join(f"{100 * r:9.1f}%" for r in rates))
