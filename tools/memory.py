"""Peak host memory of one PPO update against the rollout size, with the tiny model's vocabulary grown
to a real checkpoint's (a benchmark that prints numbers, not a test).

    python tools/memory.py                                  # vocabularies 32,064 and 152,064; 4, 16, 64 steps per env
    python tools/memory.py --vocab 32064 --steps 4 16

Each cell runs in a fresh process: the tiny LLaVA (random weights, so every answer runs to
--max-new-tokens) with its vocabulary grown to V tokens (llava-v1.6-mistral-7b-hf: 32,064;
Qwen2.5-VL-7B: 152,064), one rollout of --num-envs x STEPS samples, then one PPO update with the
KL term on (its default). Printed: the process's peak resident memory during the update (VmHWM,
reset just before it) and how far it rose above the resident memory before the update.
"""
import argparse
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def status_kb(field):
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def one_update(vocab, steps, num_envs, micro_batch, max_new_tokens):
    """Runs in the child process: -> (MB before the update, peak MB during it)."""
    sys.path.insert(0, HERE)
    import random
    import torch
    import envs
    import rl4vlm as R
    torch.manual_seed(0)
    args = R.parse_args(["--num-envs", str(num_envs), "--num-steps", str(steps), "--micro-batch-size", str(micro_batch),
                         "--max-new-tokens", str(max_new_tokens), "--update-epochs", "1", "--target-kl", "1e9"])
    model, processor = R.build_tiny("llava", "mini")
    tok = processor.tokenizer
    tok.add_tokens([f"<v{i}>" for i in range(vocab - len(tok))])  # ids the random model samples and decodes
    model.resize_token_embeddings(len(tok))
    value_head = R.make_value_head(R.text_hidden_size(model))
    optimizer = torch.optim.Adam(list(model.parameters()) + list(value_head.parameters()), lr=1e-5)
    agent = R.Agent(model, processor, value_head, torch.device("cpu"), "tiny", ref=R.make_reference(model))
    pool = envs.EnvPool("numberline", [envs.episode_seed("rollout", i) for i in range(num_envs)])
    rollout = R.collect_rollout(agent, pool, R.generation_config(model, processor, args), args, random.Random(0),
                                R.make_timer()[0])
    adv, ret = R.compute_gae(rollout.rewards, rollout.values, rollout.terminated, rollout.truncated,
                             rollout.final_values, rollout.last_values, args.gamma, args.gae_lambda)
    before = status_kb("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, the peak, to the current RSS
    R.ppo_update(agent, optimizer, rollout, adv, ret, args, random.Random(0))
    answer = sum(len(s["response_ids"]) for s in rollout.samples) / len(rollout.samples)
    return before / 1024, status_kb("VmHWM") / 1024, len(rollout.samples), answer


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[32064, 152064], help="vocabulary sizes")
    p.add_argument("--steps", type=int, nargs="+", default=[4, 16, 64], help="rollout steps per env")
    p.add_argument("--num-envs", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(*one_update(*a.child, a.num_envs, a.micro_batch_size, a.max_new_tokens))
        sys.exit(0)
    print(f"one PPO update, tiny LLaVA, --num-envs {a.num_envs} --micro-batch-size {a.micro_batch_size} "
          f"--max-new-tokens {a.max_new_tokens}, KL term on")
    print("| vocabulary | steps per env | samples | answer tokens | RSS before the update | peak during it | rise |")
    print("|---|---|---|---|---|---|---|")
    for vocab in a.vocab:
        for steps in a.steps:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", str(vocab), str(steps), "--num-envs",
                   str(a.num_envs), "--micro-batch-size", str(a.micro_batch_size), "--max-new-tokens",
                   str(a.max_new_tokens)]
            r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if r.returncode:
                last = (r.stderr.strip().splitlines() or ["?"])[-1]
                print(f"| {vocab:,} | {steps} | | | | failed: {last} (exit {r.returncode}) | |", flush=True)
                continue
            before, peak, n, answer = map(float, r.stdout.split()[-4:])
            print(f"| {vocab:,} | {steps} | {n:.0f} | {answer:.0f} | {before:,.0f} MB | {peak:,.0f} MB | "
                  f"{peak - before:,.0f} MB |", flush=True)
