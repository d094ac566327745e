"""How many weights do a few PPO updates at a small learning rate change? fp32 weights, --dtype bfloat16
(fp32 weights that Adam steps, bf16 compute), and bf16 weights that Adam steps directly, which round most
of its steps of about lr x 1 away (a bf16 weight near 1 moves in steps of 2**-8). The tiny model on
NumberLine, a few environments, lr 1e-5.

    python dev/bf16_steps.py
"""
import os
import random
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import envs  # noqa: E402
import rl4vlm as R  # noqa: E402


def moved(dtype, raw_bf16=False, updates=3):
    """-> the share of trainable weights that differ from their start after each of `updates` updates."""
    torch.manual_seed(0)
    args = R.parse_args(["--task", "numberline", "--dtype", dtype, "--lr", "1e-5", "--num-steps", "2",
                         "--num-envs", "4", "--max-new-tokens", "12", "--minibatch-size", "8",
                         "--micro-batch-size", "4", "--save-dir", os.path.join("runs", "bf16-steps")])
    agent = R.build_agent(args, torch.device("cpu"))
    if raw_bf16:  # the weights themselves in bf16, as full fine-tuning in 16 bits was before --dtype
        agent.model.to(torch.bfloat16)
        agent.model.compute_dtype = None
    agent.ref = R.make_reference(agent.model)
    optimizer, rng = R.rl_optimizer(agent, args), random.Random(0)
    start = {n: p.detach().clone() for n, p in agent.model.named_parameters() if p.requires_grad}
    pool = envs.EnvPool("numberline", [envs.episode_seed("rollout", i) for i in range(args.num_envs)])
    gen_config, shares = R.generation_config(agent.model, agent.processor, args), []
    for _ in range(updates):
        ro = R.collect_rollout(agent, pool, gen_config, args, rng, R.make_timer()[0])
        advantages, returns = R.compute_gae(ro.rewards, ro.values, ro.terminated, ro.truncated, ro.final_values,
                                            ro.last_values, args.gamma, args.gae_lambda)
        R.ppo_update(agent, optimizer, ro, advantages, returns, args, rng)
        now = dict(agent.model.named_parameters())
        changed = sum(int((now[n] != w.to(now[n].dtype)).sum()) for n, w in start.items())
        shares.append(changed / sum(w.numel() for w in start.values()))
    return shares


if __name__ == "__main__":
    for label, dtype, raw in (("fp32", "float32", False), ("--dtype bfloat16", "bfloat16", False),
                              ("bf16 weights stepped directly", "float32", True)):
        print(f"{label}: weights changed after each update: "
              + ", ".join(f"{100 * s:.1f}%" for s in moved(dtype, raw)))
