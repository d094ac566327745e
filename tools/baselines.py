"""Success rates of the random and the expert policy on the evaluation seeds of rl4vlm.py.

    python tools/baselines.py --episodes 2000

The random policy is the floor of the results table (a uniformly random legal action every step);
the expert (envs.py's expert_action: exact solver, DP-optimal Blackjack) is the ceiling.
For Blackjack it also prints the policies "hit below N, whatever the dealer shows", and the expert
with soft hands (an ace counted as 11) or hard hands played that way: their exact win rates
(infinite deck) show how much of the ceiling needs the dealer's card, and how much the soft hands.
"""
import argparse
import functools
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402
from envs import episode_seed  # noqa: E402  (episode j of an evaluation is reset(seed=episode_seed("evaluation", j)))


def hit_below(n):
    """Blackjack: "hit" while the player's total is below n, whatever the dealer's card."""
    return lambda env, info: env.action_names.index("hit" if info["player_total"] < n else "stand")


def blind_hits(n):
    """hit_below(n) for exact_win_rate: a hand of hard value `hard` (aces as 1), dealer up-card `up`."""
    return lambda hard, ace, up: envs._best(hard, ace) < n


def expert_except(n, soft):
    """The expert, but its soft hands (soft=True) or its hard ones play "hit below n" instead."""
    blind = blind_hits(n)

    def hits(hard, ace, up):
        is_soft = envs._best(hard, ace) != hard
        return (blind if is_soft == soft else envs.blackjack_expert_hits)(hard, ace, up)
    return hits


def policy_chances(hits):
    """Exact chances to win on the infinite deck under a policy hits(hard, ace, up) -> True to hit, or the
    probability of hitting (a sampled policy), from a hand of hard value `hard` (aces as 1) against the
    dealer's up-card value `up`. -> (chances, playing): chances(hand) = (the chance by standing, by hitting
    and then playing the policy); playing(hand) = the chance with the policy choosing."""
    @functools.lru_cache(maxsize=None)
    def chances(hard, ace, up):
        total = envs._best(hard, ace)  # stand: win when the dealer ends lower or busts (final total 0)
        stand = sum(p for final, p in envs._dealer_final(up, up == 1).items() if total > final)
        hit = sum(p * playing(hard + v, ace or v == 1, up) for v, p in envs.DRAW if hard + v <= 21)
        return stand, hit

    def playing(hard, ace, up):
        h = float(hits(hard, ace, up))
        stand, hit = chances(hard, ace, up)
        return h * hit + (1 - h) * stand
    return chances, playing


def exact_win_rate(hits):
    """Exact win rate on the infinite deck, summed over every deal, of a policy hits(hard, ace, up) -> True
    to hit, or the probability of hitting (a sampled policy)."""
    playing = policy_chances(hits)[1]
    return sum(pu * pa * pb * playing(a + b, 1 in (a, b), up)
               for up, pu in envs.DRAW for a, pa in envs.DRAW for b, pb in envs.DRAW)


def success_rate(task, policy, episodes):
    env, rng, wins = envs.make(task, image_size=56), random.Random(0), 0
    for j in range(episodes):
        _, info = env.reset(seed=episode_seed("evaluation", j))
        total, done = 0.0, False
        while not done:
            if callable(policy):  # policy(env, info) -> action index
                a = policy(env, info)
            else:
                a = env.expert_action() if policy == "expert" else rng.randrange(len(env.action_names))
            _, r, terminated, truncated, info = env.step(a)
            total, done = total + r, terminated or truncated
        wins += total > 0
    return wins / episodes


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=2000)
    args = p.parse_args()
    print(f"success rate over the {args.episodes} evaluation episodes of rl4vlm.py")
    print(f"{'policy':8s} " + " ".join(f"{t:>10s}" for t in envs.TASKS))
    for policy in ("random", "expert"):
        rates = [success_rate(t, policy, args.episodes) for t in envs.TASKS]
        print(f"{policy:8s} " + " ".join(f"{100 * r:9.1f}%" for r in rates))
    print("\nBlackjack, hit below N whatever the dealer shows: exact win rate, and on the evaluation seeds")
    for n in range(12, 18):
        print(f"hit below {n}: {100 * exact_win_rate(blind_hits(n)):.1f}% exact, "
              f"{100 * success_rate('blackjack', hit_below(n), args.episodes):.1f}% on the evaluation seeds")
    print("\nBlackjack, exact win rate")
    for name, hits in (("the expert", envs.blackjack_expert_hits),
                       ("the expert, soft hands hit below 14", expert_except(14, True)),
                       ("the expert, hard hands hit below 14", expert_except(14, False))):
        print(f"{name}: {100 * exact_win_rate(hits):.2f}%")
