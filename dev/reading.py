"""Research probes of a saved model: where its episodes are lost, and what its policy table is.

    python dev/reading.py runs/p24-s1/model --play                # formula games, NumberLine
    python dev/reading.py runs/bj-s1/model --policy               # Blackjack, NumberLine
    python dev/reading.py runs/bj-s1/model --three-cards --states 192     # Blackjack
    python dev/reading.py runs/bj-s1/model --all-deals            # Blackjack

Beyond tools/reading.py's reading probe (printed too). --play plays the probe start states to the end
and says where an episode is lost: in a formula game, a plan that stops solving the cards or an action
that is not the plan's next unit; in NumberLine, how many moves go the wrong way, and in which states.
--policy: in Blackjack, every two-card hand (hard totals 5 to 20, soft A2 to A9) against every dealer
card, 8 times each: how often it hits, each choice that differs from the expert's (exact dynamic
programming) marked, and the exact win rate of the policy the table describes (sampled as the model
samples, and its majority choice); in NumberLine, each start state 8 times: do the thoughts relate the
numbers right ("... is larger"), does the action follow them, and where not. Probes, no evaluation
episode played. --three-cards: Blackjack's hands after one hit, which the start states never show: are
they read, and what do their actions cost in the chance to win? --all-deals: Blackjack's every deal of two
cards against every dealer card, 4 times each: totals made by other cards than --policy's one pair per
row (a 7 and a 5, not a 10 and a 2; the ace second), and the exact win rate of the choices made there.
In formula games it also checks the plan the thoughts write: does it use each card once and make the
target?
"""
import argparse
import collections
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def written_plan(text, target):
    """The formula a formula game's answer plans in its thoughts ("...; 2 | * 6 makes 12." -> ["2", "*",
    "6"]; the bar, where the formula so far ends, is not a unit); [] if none."""
    import re
    import rl4vlm
    objs = rl4vlm._json_objects(text)
    found = re.search(rf"; (.+) makes {target}\b", str((objs[0] if objs else {}).get("thoughts", "")))
    return [u for u in found.group(1).split() if u != "|"] if found else []


def plan_accuracy(task, answers, infos):
    """Formula games: the share of answers whose thoughts write a formula that solves the cards
    ("...; | 2 * 6 makes 12."), and the share of deals that have one (what a perfect reader and solver
    would score). -> (solved, solvable), or None for the other tasks."""
    import envs
    if task not in ("ezpoints", "points24"):
        return None
    game = envs.EZPointsEnv if task == "ezpoints" else envs.Points24Env
    solved = solvable = 0
    for text, info in zip(answers, infos):
        plan = written_plan(text, game.target)
        solved += envs.solves(plan, info["numbers"], game.target)
        solvable += bool(envs.continue_solution(info["numbers"], [], game.target, game.ops))
    n = max(len(infos), 1)
    return solved / n, solvable / n


def plan_following(task, steps):
    """Formula games, played episodes: steps is a list of (info before the step, the answer, the unit
    played). -> {measure: share}: of all steps, those whose thoughts write a plan that solves the cards
    and starts with the formula so far; of those, the ones that play the plan's next unit."""
    import envs
    game = envs.EZPointsEnv if task == "ezpoints" else envs.Points24Env
    valid = followed = 0
    for info, text, played in steps:
        plan = written_plan(text, game.target)
        so_far = [u for u in info["formula"].split() if u != envs.BLANK]
        if plan[:len(so_far)] == so_far and envs.solves(plan, info["numbers"], game.target):
            valid += 1
            followed += played == (plan[len(so_far)] if len(plan) > len(so_far) else "=")  # a written plan: "="
    return {"plan solves and continues the formula": valid / max(len(steps), 1),
            "of those, the action is its next unit": followed / max(valid, 1)}


def right_move(info):
    """NumberLine: the move that brings current closer to target."""
    return "+" if info["target"] > info["current"] else "-"


def relation_following(answers, infos):
    """NumberLine: answers and the envs' infos. -> (share whose thoughts relate the two numbers right,
    share whose action follows the relation they write, Counter of (current, target) -> answers whose
    action is not the right move; no single legal action counts as not)."""
    import re
    import envs
    import rl4vlm
    names = envs.make("numberline").action_names
    right = follows = 0
    wrong = collections.Counter()
    for text, info in zip(answers, infos):
        fields = envs.NumberLineEnv.state_fields(info)
        current, target = fields["current number"], fields["target number"]
        said = re.search(r"is (larger|smaller)", text)
        right += bool(said) and said.group(1) == ("larger" if target > current else "smaller")
        a = rl4vlm.parse_action(text, names)
        move = None if a is None else names[a]
        follows += bool(said) and move == {"larger": "+", "smaller": "-"}[said.group(1)]
        wrong[(current, target)] += move != right_move(info)
    n = max(len(infos), 1)
    return right / n, follows / n, +wrong


def wrong_moves(steps):
    """NumberLine, steps played: [(info, answer, action name played)]. -> (Counter of (current, target) ->
    steps there whose move was wrong, Counter of (current, target) -> steps there)."""
    wrong, seen = collections.Counter(), collections.Counter()
    for info, _, played in steps:
        state = (info["current"], info["target"])
        seen[state] += 1
        wrong[state] += played != right_move(info)
    return +wrong, seen


def blackjack_states():
    """Two-card hands against each dealer up-card rank: [(hand, rank, obs, info, the expert's action
    name)]. hand: "5".."20" hard (a 2 and a card up to 11, then a 10 and a card), "A2".."A9" soft.
    The dealer's face-down card is a 5 (no answer can see it)."""
    import envs
    env, out = envs.make("blackjack"), []
    hands = [(str(t), ["2", str(t - 2)] if t <= 11 else ["10", str(t - 10)]) for t in range(5, 21)]
    for label, cards in hands + [(f"A{k}", ["A", str(k)]) for k in range(2, 10)]:
        for rank in envs.RANKS[1:] + envs.RANKS[:1]:  # 2 .. K, then A
            obs, info = env.reset(seed=0, options={"player": cards, "dealer": [rank, "5"]})
            out.append((label, rank, obs, info, env.action_names[env.expert_action()]))
    return out


def hits_of(text, names):
    """Blackjack: how much an answer hits: 1 or 0, or 0.5 when it names no single legal action (a coin flip
    is played then, as in a run)."""
    import rl4vlm
    a = rl4vlm.parse_action(text, names)
    return 0.5 if a is None else float(names[a] == "hit")


def table_win_rate(hit_share):
    """Exact win rate (infinite deck) of the policy a --policy table describes. hit_share: {(hand, rank):
    share of answers that hit} over blackjack_states()' hands. A hand of three or more cards plays its
    total's row (hard 4 the row of 5, soft 12 the row of A2), a 21 stands; the 10, J, Q and K columns are
    averaged, since they are one dealer value."""
    import envs
    from tools.baselines import exact_win_rate
    share = collections.defaultdict(list)
    for (hand, rank), h in hit_share.items():
        share[hand, envs.VALUE[rank]].append(h)

    def hits(hard, ace, up):
        total = envs._best(hard, ace)
        if total >= 21:
            return 0.0
        hand = f"A{max(total - 11, 2)}" if total != hard else str(max(hard, 5))
        return sum(share[hand, up]) / len(share[hand, up])
    return exact_win_rate(hits)


def every_deal():
    """Blackjack: every deal of two player cards (13 x 13 ranks, in order) against every dealer up-card
    (13), 2,197 in all, each as likely as the infinite deck makes it: [(obs, info)]. The suits and the
    face-down card come from a fixed generator."""
    import envs
    env, rng, deals = envs.make("blackjack"), random.Random(0), []
    for up in envs.RANKS:
        for a in envs.RANKS:
            for b in envs.RANKS:
                deals.append(env.reset(seed=rng.randrange(2 ** 31),
                                       options={"player": [a, b], "dealer": [up, rng.choice(envs.RANKS)]}))
    return deals


def deals_win_rate(infos, hit_share):
    """Exact win rate (infinite deck) of a policy known at every two-card deal: hit_share[i], the share of
    answers that hit at infos[i] (every_deal()'s). The first choice is each deal's own; a hand of three or
    more cards plays the mean share of the deals with its total, hard or soft, against its dealer value (a
    21 stands). -> (win rate, {kind of hand: chance to win lost against the better first choice})."""
    import envs
    from tools.baselines import policy_chances
    hands, rows = [], collections.defaultdict(list)
    for info, h in zip(infos, hit_share):
        hard, ace = sum(envs.VALUE[r] for r in info["player_cards"]), "A" in info["player_cards"]
        up, total = envs.VALUE[info["dealer_card"]], envs._best(hard, ace)
        hands.append((hard, ace, up, h))
        rows[total, total != hard, up].append(h)

    def hits(hard, ace, up):  # after a hit: the mean of the two-card deals with the same total
        total = envs._best(hard, ace)
        if total >= 21:
            return 0.0
        row = rows[total, total != hard, up]
        return sum(row) / len(row)
    chances = policy_chances(hits)[0]
    rate, lost = 0.0, collections.Counter()
    for hard, ace, up, h in hands:
        stand, hit = chances(hard, ace, up)
        chosen = h * hit + (1 - h) * stand
        rate += chosen
        kind = "soft" if envs._best(hard, ace) != hard else "hard 12-16" if 12 <= hard <= 16 else "hard, other"
        lost[kind] += max(stand, hit) - chosen
    return rate / len(hands), {kind: v / len(hands) for kind, v in sorted(lost.items())}


def three_card_states(n):
    """Blackjack: n hands of three cards under 21, each a probe deal with one card more ("hit"), hands
    that bust or make 21 skipped. -> [(obs, info)]."""
    import envs
    env, hands, j = envs.make("blackjack"), [], 0
    while len(hands) < n:
        env.reset(seed=envs.episode_seed("probe", j))
        j += 1
        obs, _, done, _, info = env.step(env.action_names.index("hit"))
        if not done and info["player_total"] < 21:
            hands.append((obs, info))
    return hands


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a run's folder, or its model/ (written by rl4vlm.py)")
    p.add_argument("--states", type=int, default=96, help="start states to read")
    p.add_argument("--batch", type=int, default=16, help="states per generate call")
    p.add_argument("--policy", action="store_true", help="Blackjack: how often it hits each two-card hand against "
                   "each dealer card, against the expert; NumberLine: do its actions follow its thoughts")
    p.add_argument("--play", action="store_true", help="play the start states to the end; formula games: check "
                   "each step's action against the thoughts' plan; NumberLine: where the wrong moves are")
    p.add_argument("--all-deals", action="store_true", help="Blackjack: every two-card deal against every dealer "
                   "card, 4 times each, and the exact win rate of the choices made there")
    p.add_argument("--three-cards", action="store_true", help="Blackjack: read hands of three cards (a probe deal "
                   "and one hit), and what their actions cost against the best choice")
    args = p.parse_args()
    if args.states < 1 or args.batch < 1:
        p.error("--states and --batch must be positive")
    if not os.path.isdir(args.model):
        sys.exit(f"reading.py: error: model folder not found: {args.model}")
    import envs
    import rl4vlm
    import torch
    from tools.reading import load
    agent, run_args = load(args.model)
    task = run_args.task
    for flag in ("three_cards", "all_deals"):
        if getattr(args, flag) and task != "blackjack":
            sys.exit(f"reading.py: error: --{flag.replace('_', '-')} is for Blackjack; this model plays {task}")
    if args.play and task == "blackjack" or args.policy and task not in ("blackjack", "numberline"):
        sys.exit(f"reading.py: error: --{'play' if args.play else 'policy'} is for "
                 f"{'the formula games and NumberLine' if args.play else 'Blackjack and NumberLine'}; "
                 f"this model plays {task}")
    gen_config = rl4vlm.generation_config(agent.model, agent.processor, run_args)
    torch.manual_seed(0)

    def answer(prompts, images):
        """The model's sampled answers, one generate call per --batch prompts."""
        texts = []
        for i in range(0, len(prompts), args.batch):
            texts += rl4vlm.sample_answers(agent, gen_config, prompts[i:i + args.batch], images[i:i + args.batch])
        return texts

    pool = envs.EnvPool(task, [envs.episode_seed("probe", i) for i in range(args.states)])
    prompts = rl4vlm.prompts(pool, True)
    answers = answer(prompts, pool.obs)  # read_probe's answers, with the RNG going on from them
    print(f"{args.model} ({task}), {args.states} start states: "
          + ", ".join(f"{f} {100 * s:.1f}%" for f, s in rl4vlm.field_shares(task, answers, pool.infos).items()))
    plan = plan_accuracy(task, answers, pool.infos)
    if plan is not None:
        print(f"  thoughts' formula solves the cards: {100 * plan[0]:.1f}% (a solution exists: {100 * plan[1]:.1f}%)")
    if args.play:
        steps, returns, rng = [], [], random.Random(0)
        for i in range(0, args.states, args.batch):  # each start state played once, a batch at a time
            seeds = [envs.episode_seed("probe", j) for j in range(i, min(i + args.batch, args.states))]
            game = envs.EnvPool(task, seeds, queue=iter([]))  # its own pool: --policy asks the probe's
            while game.active:
                texts = answer(rl4vlm.prompts(game, True), game.observations())
                actions, _ = rl4vlm.choose_actions(texts, game.action_names, rng)
                steps += [(game.infos[e], t, game.action_names[a]) for e, t, a in zip(game.active, texts, actions)]
                returns += game.step(actions)[4]
        success = sum(r > 0 for r in returns) / len(returns)
        print(f"  played to the end: {len(steps)} steps, success {100 * success:.1f}%")
        if task == "numberline":
            wrong, seen = wrong_moves(steps)
            print(f"  wrong moves: {sum(wrong.values())} of {len(steps)} steps; where, of the steps there: "
                  + (", ".join(f"{s}: {w} of {seen[s]}" for s, w in wrong.most_common(5)) or "none"))
        else:
            for name, share in plan_following(task, steps).items():
                print(f"  {name}: {100 * share:.1f}%")
    if args.policy and task == "numberline":
        k = 8
        infos = pool.infos * k
        texts = answer(prompts * k, list(pool.obs) * k)
        right, follows, wrong = relation_following(texts, infos)
        asked = collections.Counter(tuple(envs.TASKS[task].state_fields(info).values()) for info in infos)
        print(f"  {len(texts)} answers ({k} per state): the thoughts relate the numbers right {100 * right:.1f}%, "
              f"the action follows them {100 * follows:.1f}%")
        print("  wrong moves at (current, target), of the answers there: "
              + (", ".join(f"{s}: {w} of {asked[s]}" for s, w in wrong.most_common(5)) or "none"))
    elif args.policy:
        states, k = blackjack_states(), 8
        prompts = [rl4vlm.build_prompt(task, pool.action_names, info, True) for _, _, _, info, _ in states] * k
        images, hits = [obs for _, _, obs, _, _ in states] * k, collections.Counter()
        for i, text in enumerate(answer(prompts, images)):
            hits[i % len(states)] += hits_of(text, pool.action_names)
        ranks = [rank for _, rank, _, _, _ in states[:13]]
        print(f"  hits, out of {k} (* the expert does the other), hand (hard total, or soft: A and a card) against "
              "the dealer's card:")
        print("    " + "".join(f"{r:>4}" for r in ranks))
        differ = 0
        for row in range(0, len(states), 13):
            cells = []
            for c in range(row, row + 13):
                wrong = (hits[c] > k / 2) != (states[c][4] == "hit")
                differ += wrong
                cells.append(f"{hits[c]:g}{'*' if wrong else ' '}".rjust(4))
            print(f"  {states[row][0]:>3}" + "".join(cells))
        print(f"  the majority choice differs from the expert's in {differ} of {len(states)} states")
        share = {(hand, rank): hits[c] / k for c, (hand, rank, _, _, _) in enumerate(states)}
        majority = {key: (h > 0.5) + (h == 0.5) / 2 for key, h in share.items()}
        expert = {(hand, rank): float(a == "hit") for hand, rank, _, _, a in states}
        print(f"  exact win rate of this table's policy (infinite deck; 3+ cards play their total's row): "
              f"sampled {100 * table_win_rate(share):.2f}%, its majority {100 * table_win_rate(majority):.2f}%, "
              f"the expert {100 * table_win_rate(expert):.2f}%")
    if args.three_cards:
        from tools.baselines import policy_chances
        chances = policy_chances(envs.blackjack_expert_hits)[0]  # the expert playing on after a hit
        hands = three_card_states(args.states)
        asks = [rl4vlm.build_prompt(task, pool.action_names, info, True) for _, info in hands]
        texts = answer(asks, [obs for obs, _ in hands])
        infos = [info for _, info in hands]
        print(f"  {args.states} hands of three cards: " + ", ".join(
            f"{f} {100 * s:.1f}%" for f, s in rl4vlm.field_shares(task, texts, infos).items()))
        cost = better = 0.0
        for text, info in zip(texts, infos):
            hard = sum(envs.VALUE[r] for r in info["player_cards"])
            stand, hit = chances(hard, "A" in info["player_cards"], envs.VALUE[info["dealer_card"]])
            h = hits_of(text, pool.action_names)
            cost += max(stand, hit) - (h * hit + (1 - h) * stand)
            better += h == (hit > stand)  # a coin flip (0.5) is neither
        print(f"  their actions: the better choice in {100 * better / args.states:.1f}%; the chance to win lost "
              f"against always the better choice: {100 * cost / args.states:.2f} points a three-card hand")
    if args.all_deals:
        deals, k = every_deal(), 4
        asks = [rl4vlm.build_prompt(task, pool.action_names, info, True) for _, info in deals] * k
        texts, infos = answer(asks, [obs for obs, _ in deals] * k), [info for _, info in deals]
        hits = [0.0] * len(deals)
        for i, text in enumerate(texts):
            hits[i % len(deals)] += hits_of(text, pool.action_names) / k
        rate, lost = deals_win_rate(infos, hits)
        print(f"  every two-card deal against every dealer card ({len(deals)}), {k} answers each: " + ", ".join(
            f"{f} {100 * s:.1f}%" for f, s in rl4vlm.field_shares(task, texts, infos * k).items()))
        print(f"  exact win rate of its choices there (a hand of 3+ cards as its total's deals): {100 * rate:.2f}%; "
              "the chance lost against the better first choice: "
              + ", ".join(f"{kind} {100 * v:.2f}" for kind, v in lost.items()) + " points")
