# %% [markdown]
# # RL4VLM on one example, step by step
#
# The method of Zhai et al., "Fine-Tuning Large Vision-Language Models as Decision-Making Agents via
# Reinforcement Learning" ([arXiv 2405.10292](https://arxiv.org/abs/2405.10292)), shown on real tensors:
# a tiny LLaVA-architecture model, trained briefly on NumberLine, looks at one image, answers, and takes
# one PPO step. Every number below comes from [`rl4vlm.py`](../rl4vlm.py)'s own functions.
#
# ```bash
# python tools/walkthrough.py                                 # top to bottom (a few minutes on a laptop CPU)
# python tools/walkthrough.py --markdown docs/walkthrough.md  # the same, written as this page
# python tools/walkthrough.py --fast                          # every cell in under a minute; the answers mean nothing
# ```
#
# Or open this file in VS Code or Jupyter (with jupytext) and run it cell by cell: each `# %%` is a cell.

# %% setup: flags, paths and the page writer (not on the page)
import argparse
import bisect
import collections
import json
import os
import random
import re
import subprocess
import sys
import time

import torch
from PIL import Image  # (transformers' image processors use it)


def repo_root():
    """The folder that holds rl4vlm.py: from this file's place, or in a notebook from the working directory."""
    here = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()
    for folder in (here, os.path.dirname(here)):
        if os.path.exists(os.path.join(folder, "rl4vlm.py")):
            return folder
    sys.exit("walkthrough.py: error: run it from the repository or its tools/ folder")


ROOT = repo_root()
sys.path.insert(0, ROOT)
import envs  # noqa: E402
import rl4vlm as R  # noqa: E402

parser = argparse.ArgumentParser(description="RL4VLM on one NumberLine example, step by step.")
parser.add_argument("--fast", action="store_true", help="8 SFT steps of 8 demonstrations and a rollout of 2 "
                    "environments x 3 steps: every cell runs, the answers mean nothing (the test's path)")
parser.add_argument("--sft-steps", type=int, help="SFT steps of the briefly trained model (default 600; 8 with --fast)")
parser.add_argument("--run-dir", help="where the briefly trained model is kept and reused (default runs/walkthrough, "
                    "runs/walkthrough-fast with --fast)")
parser.add_argument("--markdown", metavar="PAGE", help="also write the page: each cell's text, code and printed "
                    "output; the pictures go to a folder named after PAGE (docs/walkthrough.md: docs/walkthrough/)")
in_notebook = "ipykernel" in sys.modules  # a kernel's own arguments are not ours
WT = parser.parse_args([] if in_notebook else sys.argv[1:])
if WT.sft_steps is not None and WT.sft_steps < 1:
    parser.error("--sft-steps must be a positive integer")
SFT_STEPS = WT.sft_steps or (8 if WT.fast else 600)
SFT_DEMOS = 8 if WT.fast else 64  # demonstrations per SFT step (64: rl4vlm.py's NumberLine recipe)
RUN_DIR = os.path.abspath(WT.run_dir or os.path.join(ROOT, "runs", "walkthrough-fast" if WT.fast else "walkthrough"))
PICTURE_DIR = os.path.splitext(os.path.abspath(WT.markdown))[0] if WT.markdown else os.path.join(RUN_DIR, "pictures")
os.makedirs(PICTURE_DIR, exist_ok=True)

try:
    import matplotlib
    if not in_notebook:
        matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
except ImportError:
    plt = None
    print("matplotlib is not installed: the token picture is skipped (pip install matplotlib)")


class Page:
    """What each cell printed and which pictures it saved, for --markdown. A cell is found by the line the
    script's top level is on, so the cells stay plain code."""

    def __init__(self, path, page):
        self.path, self.page, self.stdout = path, page, sys.stdout
        with open(path) as f:
            self.source = f.read().split("\n")
        self.starts = [i + 1 for i, line in enumerate(self.source) if line.startswith("# %%")]  # 1-based
        self.printed, self.pictures = collections.defaultdict(list), collections.defaultdict(list)

    def cell(self):
        frame = sys._getframe(1)
        while frame and not (frame.f_code.co_filename == self.path and frame.f_code.co_name == "<module>"):
            frame = frame.f_back
        return bisect.bisect_right(self.starts, frame.f_lineno) - 1 if frame else -1

    def write(self, text):  # stands in for sys.stdout: prints, and keeps the text under its cell
        self.stdout.write(text)
        self.printed[self.cell()].append(text)

    def flush(self):
        self.stdout.flush()

    def markdown(self):
        parts, ends = [], self.starts[1:] + [len(self.source) + 1]
        for k, (start, end) in enumerate(zip(self.starts, ends)):
            title, body = self.source[start - 1], "\n".join(self.source[start:end - 1]).strip()
            if "[markdown]" in title:
                parts.append(re.sub(r"^# ?", "", body, flags=re.M))
                continue
            if "(not on the page)" not in title:
                parts.append(f"```python\n{body}\n```")
            printed = "".join(self.printed[k]).rstrip()
            if printed and "(not on the page)" not in title:
                parts.append(f"```\n{printed}\n```")
            parts += [f"![]({os.path.relpath(p, os.path.dirname(os.path.abspath(self.page)))})"
                      for p in self.pictures[k]]
        return "\n\n".join(parts) + "\n"


PAGE = Page(__file__, WT.markdown) if WT.markdown and not in_notebook else None
if PAGE:
    sys.stdout = PAGE


def picture(name):
    """The path a picture is saved to; on the page it follows the cell that saved it."""
    path = os.path.join(PICTURE_DIR, name)
    if PAGE:
        PAGE.pictures[PAGE.cell()].append(path)
    return path


def show(path):
    """In a notebook, the picture below the cell; elsewhere, where it was saved."""
    if in_notebook:
        from IPython.display import Image, display
        display(Image(path))
    elif not PAGE:
        print(f"(picture: {os.path.relpath(path)})")


def draw_tokens(rows, path):
    """rows: [(title, [(token text, "thought" | "action" | "neither", log p or None)])] -> one PNG, each token a
    box coloured by its mask with its log p under it, wrapped like text."""
    colours = {"thought": "#9ecae1", "action": "#fdae6b", "neither": "#d9d9d9"}
    width, lines = 96, []  # in characters of the monospace font
    for title, tokens in rows:
        lines.append(("title", title))
        line, used = [], 0
        for text, kind, logp in tokens:
            label = text.replace(" ", "\u00b7").replace("\n", "\\n")  # a space as a middle dot
            number = "" if logp is None else f"{logp:.2g}"
            w = max(len(label), len(number), 4) + 1
            if used + w > width and line:
                lines.append(("tokens", line))
                line, used = [], 0
            line.append((used, w, label, kind, number))
            used += w
        lines.append(("tokens", line))
    heights = [0.8 if kind == "title" else 2.0 for kind, _ in lines]
    fig = plt.figure(figsize=(width * 0.105, sum(heights) * 0.2 + 0.5))
    ax = fig.add_axes([0.01, 0.01, 0.98, 0.98 - 0.5 / (sum(heights) * 0.2 + 0.5)])
    y = 0.0
    for (kind, content), h in zip(lines, heights):
        if kind == "title":
            ax.text(0, -y - 0.6, content, fontsize=9, fontweight="bold", va="center")
        for x, w, label, mask, number in content if kind == "tokens" else []:
            ax.add_patch(plt.Rectangle((x, -y - 1.8), w - 0.3, 1.7, color=colours[mask], lw=0))
            ax.text(x + (w - 0.3) / 2, -y - 0.6, label, fontsize=8, family="monospace", ha="center", va="center")
            ax.text(x + (w - 0.3) / 2, -y - 1.35, number, fontsize=6.5, ha="center", va="center", color="#333333")
        y += h
    ax.set_xlim(0, width)
    ax.set_ylim(-y, 0)
    ax.axis("off")
    fig.legend(handles=[matplotlib.patches.Patch(color=c, label=k + (" (padding)" if k == "neither" else ""))
                        for k, c in colours.items()], loc="upper right", ncol=3, fontsize=8, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_briefly(run_dir, sft_steps, demos):
    """-> run_dir/model: rl4vlm.py's SFT alone (`--num-updates 0`), `sft_steps` steps of `demos` demonstrations.
    A model trained so before is reused, and what its training printed is printed again."""
    model_dir, sft_log = os.path.join(run_dir, "model"), os.path.join(run_dir, "walkthrough_sft.log")
    rel = os.path.relpath(run_dir)
    try:
        with open(os.path.join(run_dir, "results.json")) as f:  # rl4vlm.py writes it last, after the model
            saved = json.load(f)["args"]
        with open(sft_log) as f:
            if (saved["sft_steps"], saved["sft_batch_size"]) == (sft_steps, demos) and os.path.isdir(model_dir):
                print(f"reusing the model in {os.path.relpath(model_dir)} (delete the folder to train again); "
                      f"its training printed:\n{f.read().replace('{run_dir}', rel)}", end="")
                return model_dir
    except (OSError, ValueError, KeyError):
        pass
    command = [sys.executable, os.path.join(ROOT, "rl4vlm.py"), "--task", "numberline", "--sft-steps", str(sft_steps),
               "--sft-batch-size", str(demos), "--num-updates", "0", "--eval-episodes", "0", "--save-dir", run_dir, "--overwrite"]
    kept, t0 = ["$ python rl4vlm.py " + " ".join(command[2:]).replace(run_dir, "{run_dir}")], time.time()
    print(kept[0].replace("{run_dir}", rel))
    run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in run.stdout:
        line, step = line.rstrip().replace(run_dir, "{run_dir}"), re.match(r"sft (\d+)/", line)
        if step and not (int(step[1]) % 100 == 0 or int(step[1]) in (1, sft_steps)):
            continue  # every 100th step's loss is enough
        print(line.replace("{run_dir}", rel))
        if not line.startswith("sft done in"):  # a time is the machine's, not the model's: printed, not kept
            kept.append(line)
    if run.wait():
        sys.exit(f"walkthrough.py: error: rl4vlm.py stopped with exit status {run.returncode}")
    print(f"trained in {time.time() - t0:.0f} s")
    with open(sft_log, "w") as f:
        f.write("\n".join(kept) + "\n")
    return model_dir


torch.manual_seed(0)

# %% [markdown]
# ## 0. A briefly trained model (the SFT warm start)
#
# The paper starts RL from a model that already answers in the task's format. The tiny model starts from
# random weights, so `rl4vlm.py` first trains it on demonstrations made on the fly: the JSON fields read
# the image (current and target number), the thoughts relate them, and the action is the expert's move
# one time in four, a coin flip otherwise: the demonstrations move the right way 62.5% of the time. So SFT
# teaches the model to read the image, but not to make its move follow what it read: that is left to RL.
# Here SFT is short (600 steps of 64 demonstrations, where the model leaves its loss plateau; the full
# recipe takes 1,300), about 2.5 minutes alone on two cores, and runs once: a second run reuses the model.

# %%
model_dir = train_briefly(RUN_DIR, SFT_STEPS, SFT_DEMOS)  # python rl4vlm.py --task numberline --num-updates 0 ...
device = torch.device("cpu")
model, processor, value_state, meta = R.load_checkpoint(model_dir, device)
value_head = R.make_value_head(R.text_hidden_size(model))  # hidden -> 1024 -> 512 -> 1
value_head.load_state_dict(value_state)
agent = R.Agent(model, processor, value_head, device, meta["base_model"])
tok = processor.tokenizer
N, T = (2, 3) if WT.fast else (4, 8)  # a small rollout: N environments x T steps, one PPO minibatch
args = R.parse_args(["--load", model_dir, "--num-envs", str(N), "--num-steps", str(T), "--update-epochs", "1",
                     "--minibatch-size", str(N * T)])
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; temperature {args.temperature}, "
      f"thought_coef {args.thought_coef}, gamma {args.gamma}, gae_lambda {args.gae_lambda}, "
      f"clip_coef {args.clip_coef}, kl_coef {args.kl_coef}, lr {args.lr}")

# %% [markdown]
# ## 1. The image and the prompt (Sec. 4.1, Fig. 3)
#
# The state is an image and a prompt. The prompt states the task, lists the legal actions and asks for one
# JSON object whose fields come in a fixed order: what the image shows, then the thoughts, then the
# action last, so that the action is written after the reasoning.

# %%
env = envs.make("numberline")
obs, info = env.reset(seed=0, options={"current": 1, "target": 4})  # obs: (224, 224, 3) uint8
action_names = env.action_names  # ["-", "+"]
path = picture("numberline.png")
Image.fromarray(obs).save(path)
show(path)
print("true state:", info)

prompt = R.build_prompt("numberline", action_names, info)
print(R.chat_texts(processor, [prompt])[0])  # the chat template around it: what the processor tokenizes

# %% [markdown]
# The processor turns this text and the image into token ids. The one `<image>` of the text becomes one
# token per image feature: the tiny model's vision tower cuts the image (resized to 112 x 112 pixels) into
# 8 x 8 patches of 14 pixels, and the model puts each patch's projected feature in place of one image
# token's embedding.

# %%
inputs = R.process(processor, [prompt], [obs], device)  # input_ids, attention_mask (1, P); pixel_values
ids = inputs["input_ids"][0]  # (P,)
image_token = model.config.image_token_id
at = (ids == image_token).nonzero()[:, 0]
print(f"{len(ids)} prompt tokens, {len(at)} of them the image token {tok.decode([image_token])!r} (id {image_token}) "
      f"at positions {at[0]}..{at[-1]}; pixel_values {tuple(inputs['pixel_values'].shape)}")
for j in range(len(ids)):  # every token, the image's run on one line
    if ids[j] != image_token:
        print(f"[{j}] {tok.decode(ids[j:j + 1])!r}")
    elif j == at[0]:
        print(f"[{at[0]}..{at[-1]}] {tok.decode([image_token])!r} x {len(at)}")

# %% [markdown]
# ## 2. A sampled answer, and the action it becomes (the post-processing f of Fig. 2)
#
# The model samples its answer at temperature 0.2, as in the paper. `parse_action` reads the one legal
# action it names. An answer that names none, or more than one, gets `None`, and the environment then
# plays a uniformly random legal action (`choose_actions`), as the paper does with illegal answers.

# %%
gen_config = R.generation_config(model, processor, args)  # plain sampling from softmax(logits / 0.2)
torch.manual_seed(1)
responses, token_logp, prompt_hidden = R.generate(model, inputs, gen_config)  # [ids (R,)], (1, R), (1, H)
answer = tok.decode(responses[0], skip_special_tokens=True)
action = R.parse_action(answer, action_names)
print(f"answer: {answer!r}")
print(f"parse_action -> {action}: {'no single legal action' if action is None else repr(action_names[action])}")
read = {k: re.search(rf'"{k}": (\d+)', answer) for k in ("current number", "target number")}
print("the answer reads", {k: int(m[1]) if m else None for k, m in read.items()}, "| the image shows", info,
      f"| the expert plays {action_names[env.expert_action()]!r}")

no_action = ('{"current number": 1, "target number": 4, '
             '"thoughts": "The current number is 1 and the target 4 is larger."}')
two_actions = '{"action": "+"} {"action": "-"}'
for text in (no_action, two_actions, '{"action": "up"}'):
    print(f"parse_action({text!r}) -> {R.parse_action(text, action_names)}")
played, invalid = R.choose_actions([two_actions] * 1000, action_names, random.Random(0))
print(f"choose_actions on 1000 copies of the two-action answer: invalid {sum(invalid)} times, played "
      f"'-' {played.count(0)} and '+' {played.count(1)} times")

# %% [markdown]
# ## 3. Which tokens are thoughts and which the action (Sec. 4.2)
#
# PPO needs log pi(a|s), the probability of the action given the state. The answer is many tokens, and the
# paper splits them in two: the thought tokens and the action tokens. Here the action tokens start at the
# `"action":` key (`action_start`). Three answers to the same prompt, scored in one batch: the sampled one,
# a demonstration answer (`format_response`) that moves the wrong way, as a coin flip in SFT's
# demonstrations may, and the answer without an action, all of whose tokens count as thoughts (no token of
# it chose the action). Answers are right-padded to one length R, and padding is in neither mask. Each
# token's log p is under softmax(logits / T), the distribution it was sampled from.

# %%
answers = [responses[0]] + [  # token ids as SFT writes its answers: " " + text, then the end token
    torch.tensor(tok(" " + text, add_special_tokens=False).input_ids + [tok.eos_token_id])
    for text in (R.format_response("numberline", info, action_names[1 - env.expert_action()]), no_action)]
samples = [R.make_sample(inputs, 0, response_ids, tok) for response_ids in answers]
batch = R.collate(samples, tok.pad_token_id, device)  # input_ids (B, P + R); thought_mask, action_mask (B, R)
with torch.no_grad():
    logprobs, _ = R.token_logprobs(model, batch, args.temperature)  # (B, R, V), and (B, H) for V(s) below
logp = R.answer_logp(logprobs, batch)  # (B, R): the log p of each answer's own tokens
thought_mask, action_mask = batch["thought_mask"], batch["action_mask"]
print(f"action_start of the sampled answer: token {R.action_start(tok, responses[0])} of {len(responses[0])}")
print(f"{'j':>3}  {'token':<28} {'mask':<8} log p")
for j in range(len(responses[0])):  # the sampled answer, token by token
    kind = "thought" if thought_mask[0, j] else "action" if action_mask[0, j] else "neither"
    print(f"{j:>3}  {tok.decode(responses[0][j:j + 1])!r:<28} {kind:<8} {logp[0, j]:.3g}")

rows = []
titles = ["the sampled answer", f"a demonstration moving {action_names[1 - env.expert_action()]!r}",
          "an answer with no action"]
for i, title in enumerate(titles):
    cells = []
    for j in range(thought_mask.shape[1]):
        kind = "thought" if thought_mask[i, j] else "action" if action_mask[i, j] else "neither"
        text = tok.decode(answers[i][j:j + 1]) if j < len(answers[i]) else "pad"
        cells.append((text, kind, None if kind == "neither" else logp[i, j].item()))
    rows.append((title, cells))
if plt is not None:
    path = picture("tokens.png")
    draw_tokens(rows, path)
    show(path)

# %% [markdown]
# ## 4. log pi for lambda = 0, 0.5 and 1 (Sec. 4.2)
#
# The paper's action log-probability weighs the thoughts by lambda (`thought_coef`, 0.5 in the paper):
#
#     log pi(a|s) = lambda * sum log p(thought tokens) + sum log p(action tokens)
#
# With lambda = 1 it is the log-probability of the whole answer, and the many thought tokens outweigh the
# few that choose the action; with lambda = 0 the thoughts get no credit or blame at all. After SFT the
# model is sure of what it reads (log p near 0 on the thoughts): its doubt sits on the action token. At
# temperature 1 the demonstrations' mix would give the right move 62.5%; sampling at T = 0.2 raises each
# probability to the 5th power before renormalising, which makes that about 93%.

# %%
log_pi = {lam: R.lambda_log_pi(logp, thought_mask, action_mask, lam) for lam in (0.0, 0.5, 1.0)}  # (B,) each
thoughts_sum = (logp * thought_mask).sum(1)  # (B,)
action_sum = (logp * action_mask).sum(1)
print(f"{'answer':<26} {'thought tokens':>14} {'sum log p':>10} {'action tokens':>14} {'sum log p':>10} "
      f"{'lambda 0':>10} {'lambda 0.5':>10} {'lambda 1':>10}")
for i, title in enumerate(titles):
    print(f"{title:<26} {int(thought_mask[i].sum()):>14} {thoughts_sum[i]:>10.4g} {int(action_mask[i].sum()):>14} "
          f"{action_sum[i]:>10.4g} {log_pi[0.0][i]:>10.4g} {log_pi[0.5][i]:>10.4g} {log_pi[1.0][i]:>10.4g}")
print(f"log pi of the sampled answer at lambda 0.5: {log_pi[0.5][0]:.7g} "
      f"= 0.5 * ({thoughts_sum[0]:.7g}) + ({action_sum[0]:.7g})")

# %% [markdown]
# This model is sure of its thoughts (log p is 0 to float precision), so lambda changes log pi only for an
# answer whose thoughts it doubts, like the third. With `--fast`, whose model has barely trained, it changes
# every row: there lambda decides how much of each update goes to the thoughts.

# %% [markdown]
# ## 5. V(s): the value head on the last prompt token (Sec. 4.2)
#
# The value head is an MLP on the VLM's last-layer hidden state at the last token of the prompt. Prompts
# are left-padded and answers right-padded, so every prompt ends at column P - 1. The model is causal: that
# position has seen the image and the prompt but no answer token, so V depends on the state alone, and all
# three rows get the same value. After SFT the value head is still its random initialisation (SFT trains
# the VLM only); PPO's value loss trains it.

# %%
P = batch["input_ids"].shape[1] - thought_mask.shape[1]  # prompt columns; answers fill the last R
print(f"batch input_ids {tuple(batch['input_ids'].shape)}: P = {P} prompt columns + R = {thought_mask.shape[1]} "
      f"answer columns; V reads column P - 1 = {P - 1}, the token {tok.decode(batch['input_ids'][0, P - 1:P])!r}")
with torch.no_grad():
    _, value, _ = R.score(model, value_head, batch, args.temperature, args.thought_coef)  # (B,)
    value_at_generate = value_head(prompt_hidden)[:, 0]  # the hidden state generate read in step 2
print(f"V(s) of the three rows: {[round(v, 5) for v in value.tolist()]}; from generate's own forward: "
      f"{value_at_generate.item():.5f}")

# %% [markdown]
# ## 6. A short rollout, and GAE's advantages and returns (Algorithm 1)
#
# N environments play T steps with the current policy; each step stores the prompt, image and answer, old
# log pi and V(s). GAE (gamma 0.9, gae_lambda 0.95, the paper's) turns the rewards into advantages:
#
#     delta_t = r_t + gamma * V(s_t+1) - V(s_t)
#     A_t = delta_t + gamma * gae_lambda * A_t+1,    return_t = A_t + V(s_t)
#
# where nothing after an episode's end counts (a time limit's end bootstraps from V of its last image).
# NumberLine pays +1 on reaching the target, 0 for a step closer and -1 for a step that is not.

# %%
pool = envs.EnvPool("numberline", [envs.episode_seed("rollout", i) for i in range(N)])
states = []  # the true state and the action of every step, for the table
step = pool.step


def step_and_record(actions):
    states.append([(pool.infos[i]["current"], pool.infos[i]["target"], action_names[a])
                   for i, a in zip(pool.active, actions)])
    return step(actions)


pool.step = step_and_record
rng = random.Random(0)
timer, seconds = R.make_timer()
rollout = R.collect_rollout(agent, pool, gen_config, args, rng, timer)  # rewards, values, log_pi: (T, N)
advantages, returns = R.compute_gae(rollout.rewards, rollout.values, rollout.terminated, rollout.truncated,
                                    rollout.final_values, rollout.last_values, args.gamma, args.gae_lambda)
ended = rollout.terminated | rollout.truncated
e = next((i for i in range(N) if ended[:, i].any()), 0)  # an environment whose episode ended, if any did
invalid = torch.tensor(rollout.invalid).view(T, N)
print(f"environment {e} of {N}, {T} steps:")
print(f"{'t':>2}  {'current -> target':>17}  {'action':>13}  {'reward':>6}  {'ended':>5}  {'V(s_t)':>8}  "
      f"{'advantage':>9}  {'return':>8}")
for t in range(T):
    current, target, move = states[t][e]
    move = f"{move!r}" + (" (random)" if invalid[t, e] else "")
    end = "term" if rollout.terminated[t, e] else "trunc" if rollout.truncated[t, e] else ""
    print(f"{t:>2}  {f'{current} -> {target}':>17}  {move:>13}  {rollout.rewards[t, e]:>6.1f}  {end:>5}  "
          f"{rollout.values[t, e]:>8.4f}  {advantages[t, e]:>9.4f}  {returns[t, e]:>8.4f}")
t = T - 1
if not ended[t, e]:
    print(f"by hand, the last step: A = r + gamma * V(next) - V = {rollout.rewards[t, e]:.1f} + {args.gamma} * "
          f"({rollout.last_values[e]:.4f}) - ({rollout.values[t, e]:.4f}) = "
          f"{rollout.rewards[t, e] + args.gamma * rollout.last_values[e] - rollout.values[t, e]:.4f}")
print(f"the whole rollout: {len(rollout.samples)} answers, {sum(rollout.invalid)} of them with no single legal "
      f"action; {int((rollout.rewards == 1).sum())} steps reached the target (+1), "
      f"{int((rollout.rewards == -1).sum())} did not get closer (-1)")

# %% [markdown]
# ## 7. One PPO update (Sec. 4.2, Algorithm 1)
#
# PPO's clipped surrogate on the ratio r = pi(a|s) / pi_old(a|s) = exp(log pi - old log pi), with the
# lambda-weighted log pi of step 4, plus a clipped value loss:
#
#     policy loss = mean over samples of max(-A * r, -A * clip(r, 1 - clip_coef, 1 + clip_coef))
#     value loss  = 0.5 * mean of max((V - return)^2, (V_clipped - return)^2)
#     loss = policy loss + vf_coef * value loss + kl_coef * KL(pi || pi_SFT)
#
# The last term is ours, not the paper's: without it the tiny model's JSON breaks within 10-20 updates
# ([departures.md](departures.md)). Before the first step the policy is the one that sampled the rollout,
# so every ratio is 1 (up to float rounding: generate's forward passes against one forward over prompt +
# answer), and pi is still pi_SFT, so the KL is 0. Here the rollout is one minibatch, so the update is one
# optimiser step.

# %%
optimizer = R.rl_optimizer(agent, args)  # Adam over the language model, projector and value head (vision frozen)
agent.ref = R.make_reference(agent.model)  # pi_SFT: a frozen copy of the policy as RL starts
batch = R.collate(rollout.samples, tok.pad_token_id, device)  # the whole rollout, (T * N, P + R)
old_log_pi, old_values = rollout.log_pi.flatten(), rollout.values.flatten()  # (T * N,)
with torch.no_grad():
    ratio_before = (R.score(model, value_head, batch, args.temperature, args.thought_coef)[0] - old_log_pi).exp()
print(f"ratios before the step: min {ratio_before.min():.6f}, max {ratio_before.max():.6f}")

stats = R.ppo_update(agent, optimizer, rollout, advantages, returns, args, rng)  # one step (its loss: before it)
print(f"the step's loss terms: policy {stats['policy_loss']:.4f} | value {stats['value_loss']:.4f} | "
      f"KL term {args.kl_coef} * {stats['ref_kl']:.4f} | clipped fraction {stats['clip_frac']:.2f}")

adv = R.normalize(advantages.flatten())  # as ppo_update normalises them
with torch.no_grad():
    ratio_after = (R.score(model, value_head, batch, args.temperature, args.thought_coef)[0] - old_log_pi).exp()
    _, after = R.ppo_loss(agent, batch, (old_log_pi, old_values, adv, returns.flatten()), args)
clipped = (ratio_after - 1).abs() > args.clip_coef
print(f"after one step: ratios {ratio_after.min():.4f}..{ratio_after.max():.4f}, clipped fraction "
      f"{clipped.float().mean():.2f} (|r - 1| > {args.clip_coef}), KL to pi_SFT {after['ref_kl']:.6f} per token")
print(f"loss terms now: policy {after['policy_loss']:.4f} | value {after['value_loss']:.4f} | "
      f"KL term {args.kl_coef * after['ref_kl']:.6f}")
ratio, clip_r = ratio_after, ratio_after.clamp(1 - args.clip_coef, 1 + args.clip_coef)  # (T * N,)
terms = torch.max(-adv * ratio, -adv * clip_r)  # the clipped surrogate of each sample
print(f"policy loss = mean of max(-A * r, -A * clip(r)) over the {len(terms)} samples = {terms.mean():.4f}; "
      f"the {min(10, len(terms))} ratios furthest from 1:")
print(f"{'sample':>6}  {'A':>7}  {'r':>7}  {'-A * r':>8}  {'-A * clip(r)':>12}  {'max':>8}  gradient")
for i in (ratio - 1).abs().argsort(descending=True)[:10].tolist():
    a, r, c = adv[i].item(), ratio[i].item(), clip_r[i].item()
    print(f"{i:>6}  {a:>7.3f}  {r:>7.4f}  {-a * r:>8.4f}  {-a * c:>12.4f}  {terms[i]:>8.4f}  "
          f"{'none: clipped' if -a * c > -a * r else 'through r'}")

# %% [markdown]
# At r = 1 the policy loss is minus the mean of the normalised advantages, 0; one step made the answers
# with a positive advantage more likely and the others less likely, and the loss went below 0. A sample
# whose ratio has left [1 - clip_coef, 1 + clip_coef] in its advantage's direction takes the clipped term,
# which does not depend on the policy: no gradient pushes it further. The wrong moves (the most negative
# advantages) moved most: their action token was unlikely, and the gradient of log p with respect to its
# logit is (1 - p) / T. `rl4vlm.py` repeats this over 2 epochs of minibatches of 32 from rollouts of 8
# environments x 16 steps, 100 times for NumberLine, and stops an update early once the approximate KL
# to the rollout's policy passes 0.02.
#
# ## Things to try
#
# Each is one command. The tiny model's runs take 8-12 minutes on two CPU cores and print one line per
# update (success, losses, KLs, one answer); compare their success after RL with the first run's.
#
# ```bash
# python rl4vlm.py --task numberline                     # the whole method: SFT, then 100 PPO updates
# python rl4vlm.py --task numberline --no-cot            # the paper's ablation: the action alone, no thoughts
# python rl4vlm.py --task numberline --thought-coef 0    # lambda = 0: the thoughts get no credit
# python rl4vlm.py --task numberline --thought-coef 1    # lambda = 1: log pi of the whole answer
# python rl4vlm.py --task numberline --kl-coef 0         # no KL term to pi_SFT (the paper's loss)
# python rl4vlm.py --task numberline --tiny-arch qwen2.5-vl                # another VLM family, tiny
# python rl4vlm.py --model llava-hf/llava-v1.6-mistral-7b-hf --lora        # the paper's backbone (one GPU, peft)
# ```

# %% write the page (not on the page)
if PAGE:
    sys.stdout = PAGE.stdout
    with open(WT.markdown, "w") as f:
        f.write(PAGE.markdown())
    print(f"wrote {os.path.relpath(WT.markdown)} and its pictures in {os.path.relpath(PICTURE_DIR)}")
