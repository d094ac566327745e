"""Do a NumberLine model's states share their move? Teach one state's right move alone, watch the others.

    python dev/nudge.py runs/numberline-s1/model --state 4 0 --steps 1 3 10

For every state (current, target) the model's probability of "+" against "-", each answer written
with the right fields and thoughts ("... the target 0 is smaller."), scored on its action part at
rl4vlm.py's temperature 0.2. Then k Adam steps (rl4vlm.py's RL step size and optimiser; the vision
encoder frozen, as in RL) raise the log-probability of one state's right action part, and the table
is printed again. Were the move decided by the thoughts' relation word, the states whose word
differs would not follow; how far they do is what RL pays at other states to fix one.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def answers_batch(processor, states, move):
    """One batch: every state's prompt and image with the demonstration answer that plays `move`."""
    import envs
    import rl4vlm
    import torch
    env, tok, rows = envs.make("numberline"), processor.tokenizer, []
    for current, target in states:
        obs, info = env.reset(seed=0, options={"current": current, "target": target})
        inputs = rl4vlm.process(processor, [rl4vlm.build_prompt("numberline", env.action_names, info)], [obs], "cpu")
        ids = tok(" " + rl4vlm.format_response("numberline", info, move), add_special_tokens=False)["input_ids"]
        rows.append(rl4vlm.make_sample(inputs, 0, torch.tensor(ids), tok))
    return rl4vlm.collate(rows, tok.pad_token_id, "cpu")


def action_logp(model, batch, temperature=0.2):
    """(B,) the log-probability of each answer's action part, from the action key on."""
    import rl4vlm
    logp = rl4vlm.answer_logp(rl4vlm.token_logprobs(model, batch, temperature)[0], batch)
    return rl4vlm.lambda_log_pi(logp, batch["thought_mask"], batch["action_mask"], thought_coef=0.0)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a NumberLine model folder written by rl4vlm.py (RUN/model)")
    p.add_argument("--state", type=int, nargs=2, default=[4, 0], metavar=("CURRENT", "TARGET"),
                   help="the state whose right move is taught")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 3, 10], help="print the table after these steps")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam's step (rl4vlm.py's RL default for the tiny model)")
    args = p.parse_args()
    if not os.path.isdir(args.model):
        sys.exit(f"nudge.py: error: model folder not found: {args.model}")
    if args.state[0] == args.state[1] or not all(0 <= x <= 5 for x in args.state):
        sys.exit("nudge.py: error: --state takes two different numbers in 0..5")
    if min(args.steps) < 1 or args.lr <= 0:
        sys.exit("nudge.py: error: --steps and --lr must be positive")
    import rl4vlm
    import torch
    try:
        model, processor, _, meta = rl4vlm.load_checkpoint(args.model, torch.device("cpu"))
    except rl4vlm.LoadError as e:
        sys.exit(f"nudge.py: error: {e}")
    if meta["task"] != "numberline" or not meta.get("cot", True):
        sys.exit(f"nudge.py: error: needs a NumberLine model with thoughts; this one plays {meta['task']}"
                 f"{'' if meta.get('cot', True) else ' without them'}")
    torch.manual_seed(0)
    states = [(c, t) for c in range(6) for t in range(6) if c != t]
    plus, minus = answers_batch(processor, states, "+"), answers_batch(processor, states, "-")
    current, target = args.state
    teach = answers_batch(processor, [tuple(args.state)], "+" if target > current else "-")

    def table(title):
        model.eval()
        with torch.no_grad():
            p_plus = torch.sigmoid(action_logp(model, plus) - action_logp(model, minus))  # of the two answers
        print(f"{title}: p(\"+\"), rows current 0-5, columns target 0-5 (right: \"+\" above the diagonal)")
        for c in range(6):
            print("    " + " ".join("  .  " if c == t else f"{p_plus[states.index((c, t))].item():.3f}"
                                    for t in range(6)))

    table("before")
    rl4vlm.freeze_vision(model)
    optimizer = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=args.lr, eps=1e-5)
    for step in range(1, max(args.steps) + 1):
        model.train()
        optimizer.zero_grad()
        (-action_logp(model, teach).sum()).backward()
        optimizer.step()
        if step in args.steps:
            table(f"after {step} step{'s' if step > 1 else ''} on {tuple(args.state)}'s right move")
