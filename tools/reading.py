"""Does a saved model read the image? Its answers' state fields against the true state.

    python tools/reading.py runs/numberline-s1-20261206-101500        # a run's folder, or its model/

The probe that a run prints after SFT (rl4vlm.read_probe): at --states start states that no run trains
or evaluates on, the model answers once, sampling at temperature 0.2, and the fields it writes before
its thoughts ("current number", "cards", "dealer card", ...) are compared with the env's true values:
how often each field is exactly right and, for lists such as the cards, how often each element is.
Beside them, what always writing the commonest true value scores: a reader that ignores the image.
It needs a model trained with CoT (without thoughts there are no fields).
"""
import argparse
import collections
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def element_shares(task, answers, infos):
    """For list fields (the cards): the share of elements right, {field: share}; not JSON counts as wrong."""
    import envs
    import rl4vlm
    right, total = collections.Counter(), collections.Counter()
    for text, info in zip(answers, infos):
        said = (rl4vlm._json_objects(text) or [{}])[0]
        for field, true in envs.TASKS[task].state_fields(info).items():
            if isinstance(true, list):
                got = said.get(field) if isinstance(said.get(field), list) else []
                right[field] += sum(a == b for a, b in zip(got, true))
                total[field] += len(true)
    return {f: right[f] / total[f] for f in total}


def constant_guess(task, infos):
    """What always writing the commonest true value scores: {field: (exact, per element or None)}."""
    import envs
    fields = [envs.TASKS[task].state_fields(info) for info in infos]
    out = {}
    for f, first in fields[0].items():
        values = [fs[f] for fs in fields]
        exact = collections.Counter(map(repr, values)).most_common(1)[0][1] / len(values)
        flat = [x for v in values for x in v] if isinstance(first, list) else None
        out[f] = (exact, flat and collections.Counter(flat).most_common(1)[0][1] / len(flat))
    return out


def load(folder):
    """A saved run's model as an rl4vlm Agent (no value head) and the run's arguments."""
    import rl4vlm
    import torch
    try:
        model, processor, _, meta = rl4vlm.load_checkpoint(folder, torch.device("cpu"))
    except rl4vlm.LoadError as e:
        sys.exit(f"reading.py: error: {e}")
    if not meta.get("cot", True):
        sys.exit("reading.py: error: this model answers without thoughts (--no-cot): it writes no state fields")
    args = rl4vlm.parse_args(["--load", folder, "--task", meta["task"], "--save-dir", tempfile.mkdtemp()])  # unused
    return rl4vlm.Agent(model, processor, None, torch.device("cpu"), meta.get("base_model")), args


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a run's folder, or its model/ (written by rl4vlm.py)")
    p.add_argument("--states", type=int, default=96, help="start states to read (a run's own probe: 96)")
    a = p.parse_args()
    if a.states < 1:
        p.error("--states must be positive")
    if not os.path.isdir(a.model):
        sys.exit(f"reading.py: error: model folder not found: {a.model}")
    import rl4vlm
    agent, args = load(a.model)
    shares, answers, infos = rl4vlm.read_probe(agent, args, a.states)
    guess, per = constant_guess(args.task, infos), element_shares(args.task, answers, infos)
    print(f"{a.model} ({args.task}), {a.states} start states: share right (model vs always the commonest value)")
    for f, share in shares.items():
        print(f"  {f}: exact {100 * share:.1f}% vs {100 * guess[f][0]:.1f}%"
              + (f"; per element {100 * per[f]:.1f}% vs {100 * guess[f][1]:.1f}%" if f in per else ""))
