"""Is a slow run the seed's or the host's? rl4vlm.py's SFT, timed against a fixed-work gauge.

    python dev/sft_speed.py --task points24 --seed 3            # the README's Points24 SFT, 2,500 steps
    python dev/sft_speed.py --every 50 --task numberline --sft-steps 200

Any rl4vlm.py flag passes through. RL is skipped (--num-updates 0 --eval-episodes 0), and the model
goes to a new temporary folder unless --save-dir is given, so no run of yours is overwritten.

Every --every SFT steps it prints the mean seconds of a step, the mean seconds of AdamW's own step
inside it, their ratio, and how many parameters, gradients and AdamW moments are denormal floats (tiny
values that some CPUs handle a hundred times slower). AdamW's step is the same work at every step
whatever the data, so its time gauges the host: when a run's steps slow down and the ratio stays put,
the host slowed down, not the run. --flush-from N switches denormals off (torch.set_flush_denormal)
from step N on, to see whether they cost time; until then the numerics are rl4vlm.py's own.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMALLEST_NORMAL = torch.finfo(torch.float32).tiny


def denormals(tensors):
    """How many entries of the float32 tensors (None skipped) are denormal: non-zero and below the
    smallest normal float."""
    return sum(int(((t.abs() < SMALLEST_NORMAL) & (t != 0)).sum()) for t in tensors
               if t is not None and t.dtype == torch.float32)


def timed_adamw(every, flush_from):
    """An AdamW that reports on the SFT loop every `every` steps (rl4vlm.sft makes its own optimiser)."""
    class TimedAdamW(torch.optim.AdamW):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.steps, self.since, self.adam_seconds = 0, time.time(), 0.0

        def step(self, *a, **k):
            t0 = time.time()
            out = super().step(*a, **k)
            self.adam_seconds += time.time() - t0
            self.steps += 1
            if self.steps % every == 0:
                step_s, adam_s = (time.time() - self.since) / every, self.adam_seconds / every
                params = [p for g in self.param_groups for p in g["params"]]
                moments = [s.get(m) for s in self.state.values() for m in ("exp_avg", "exp_avg_sq")]
                print(f"sft_speed step {self.steps} | {step_s:.3f} s a step | AdamW {1000 * adam_s:.2f} ms | "
                      f"ratio {step_s / adam_s:.0f} | denormal params {denormals(params)} "
                      f"grads {denormals(p.grad for p in params)} moments {denormals(moments)}", flush=True)
                self.since, self.adam_seconds = time.time(), 0.0
            if self.steps == flush_from:
                torch.set_flush_denormal(True)
                print(f"sft_speed step {self.steps} | denormals flushed to zero from here on", flush=True)
            return out
    return TimedAdamW


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--every", type=int, default=100, help="SFT steps per printed line")
    p.add_argument("--flush-from", type=int, default=0, help="flush denormals to zero from this step (0: never)")
    args, rest = p.parse_known_args()
    if args.every < 1 or args.flush_from < 0:
        sys.exit("sft_speed.py: error: --every must be >= 1 and --flush-from >= 0")
    import rl4vlm
    torch.optim.AdamW = timed_adamw(args.every, args.flush_from)
    if not any(a.startswith("--save-dir") for a in rest):
        rest += ["--save-dir", tempfile.mkdtemp(prefix="sft_speed-")]
    run_args = rl4vlm.parse_args(["--num-updates", "0", "--eval-episodes", "0"] + rest)
    if run_args.sft_steps == 0:
        sys.exit("sft_speed.py: error: no SFT steps to time (a --load or --model run skips SFT; give --sft-steps)")
    sys.exit(rl4vlm.cli(run_args))
