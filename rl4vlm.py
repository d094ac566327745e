"""RL4VLM in one file: fine-tune a vision-language model (VLM) as a decision-making agent with PPO.

Paper: Zhai et al., "Fine-Tuning Large Vision-Language Models as Decision-Making Agents via
Reinforcement Learning", NeurIPS 2024, https://arxiv.org/abs/2405.10292

At every step the VLM sees the environment's image and a prompt that lists the legal actions, and
writes a JSON answer {"...": ..., "thoughts": "...", "action": "..."}, chain-of-thought first. The
answer is parsed into an action (none or several: a random legal one), and PPO with GAE trains the
VLM and a value head on the task's reward, with
    log pi(a|s) = thought_coef * log p(thought tokens) + log p(action tokens)       (paper Sec. 4.2)
and V(s) read from the VLM's last hidden state at the end of the prompt.

The file reads top to bottom in the order the method runs, main() last; the plumbing follows it.
Every departure from the paper and the official code (github.com/RL4VLM/RL4VLM) is listed, with its
reason, in docs/departures.md. The largest: a tiny model trained from scratch by default, an SFT warm
start made on the fly by the environments' experts, and a KL term to the SFT policy (--kl-coef).

Run:
    python rl4vlm.py --task numberline                   # Table 1's recipe: SFT warm start + PPO, tiny model, CPU
    python rl4vlm.py --task blackjack --no-cot           # the paper's CoT ablation
    python rl4vlm.py --model llava-hf/llava-v1.6-mistral-7b-hf --lora      # the paper's backbone, one GPU
    torchrun --nproc_per_node 2 rl4vlm.py --task numberline                 # data-parallel, 2 processes
    python rl4vlm.py --tiny-arch qwen2.5-vl              # the same method on a tiny Qwen2.5-VL, CPU
    python rl4vlm.py --load runs/numberline-s1 --num-updates 0 --eval-episodes 500     # evaluate a run
"""

import argparse
import collections
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import socket
import time
import urllib.parse
import warnings
import weakref

import envs  # the tasks: light (gymnasium, numpy, pillow), so `--help` still answers at once


# ----------------------------------------------------------------------------------------------
# Arguments. Parsed before torch and transformers are imported, so that `--help` answers at once.

# Each task's recipe (Table 1, docs/results.md): RECIPE with the task's entries over it; a real checkpoint
# takes REAL's over both (no SFT; sizes for a 7B model with --lora on one 80 GB GPU; the official code's lr
# and answer length). A flag given wins. Why each entry is what it is: docs/LOG.md.
RECIPE = dict(sft_steps=1300, sft_batch_size=32, sft_expert_prob=1.0, sft_restart_prob=0.0, sft_warmup=0,
              num_updates=100, num_envs=8, num_steps=16, lr=1e-4, kl_coef=1.0, micro_batch_size=32,
              max_new_tokens=96, gradient_checkpointing=False, eval_episodes=200, eval_start_episodes=None,
              eval_envs=None)  # None: as --eval-episodes, as --num-envs
TASK_RECIPES = {
    "numberline": dict(sft_batch_size=64, sft_expert_prob=0.25),
    "ezpoints": dict(sft_steps=2000, sft_restart_prob=0.5, sft_warmup=200, num_updates=20),
    "points24": dict(sft_steps=2500, sft_batch_size=64, sft_restart_prob=0.5, sft_warmup=200, num_updates=20,
                     num_envs=16, lr=3e-5, eval_envs=8),
    "blackjack": dict(sft_expert_prob=0.5, sft_warmup=200, num_updates=200, num_envs=16, num_steps=8, kl_coef=2.0,
                      eval_episodes=10_000, eval_start_episodes=2000, eval_envs=96),
}
REAL = dict(sft_steps=0, num_envs=4, lr=1e-5, micro_batch_size=4, max_new_tokens=256, gradient_checkpointing=True,
            eval_envs=None)
TINY_ARCHS = {"llava": "llava", "llava-next": "llava_next", "qwen2-vl": "qwen2_vl", "qwen2.5-vl": "qwen2_5_vl",
              "qwen3-vl": "qwen3_vl", "idefics3": "idefics3", "gemma3": "gemma3"}  # -> model_type in FAMILIES


def recipe(task, tiny=True):
    return {**RECIPE, **TASK_RECIPES.get(task, {}), **({} if tiny else REAL)}


def by_task(key, like=None):
    """--help's default of a recipe entry: "(default: numberline 100, ezpoints 20, ...; a real checkpoint 4)";
    an entry that is None takes the value of the entry `like`."""
    def value(r):
        v = r[key] if r[key] is not None else r[like]
        return ("on" if v else "off") if isinstance(v, bool) else v
    values = [value(recipe(task)) for task in envs.TASKS]
    text = ", ".join(f"{t} {v}" for t, v in zip(envs.TASKS, values)) if len(set(values)) > 1 else values[0]
    real = value(recipe("numberline", tiny=False))
    return f"(default: {text}{f'; a real checkpoint {real}' if key in REAL or like in REAL else ''})"


def checked(kind, ok, what):
    """An argparse type: kind(text), refused in one line unless ok(value)."""
    def parse(text):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


positive_int = checked(int, lambda v: v > 0, "a positive integer")
nonneg_int = checked(int, lambda v: v >= 0, "zero or more")
positive_float = checked(float, lambda v: 0 < v < math.inf, "a positive number")  # nan fails too
nonneg_float = checked(float, lambda v: 0 <= v < math.inf, "zero or more")
unit_float = checked(float, lambda v: 0 <= v <= 1, "between 0 and 1")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump: the error is what the user needs to see
        sys.exit(f"rl4vlm.py: error: {message} (see --help)" if os.environ.get("RANK", "0") == "0" else 2)


class HelpFormatter(argparse.HelpFormatter):
    def _get_help_string(self, action):  # a fixed default shown; a default that varies is in the help itself
        fixed = action.default not in (None, False, argparse.SUPPRESS) and "default" not in action.help
        return action.help + (" (default: %(default)s)" if fixed else "")


def make_parser():
    p = Parser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    g = p.add_argument_group("environment")
    g.add_argument("--task", choices=list(envs.TASKS), help="the game (default: numberline, or a --load model's own)")
    g.add_argument("--num-envs", type=positive_int, help=f"environments, one batched generate {by_task('num_envs')}")
    g.add_argument("--seed", type=nonneg_int, default=1, help="seeds torch, python and the training episodes")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", help="'tiny' builds a small random VLM offline; else a folder or hub id")
    g.add_argument("--load", help="a folder written by this script (a run's, or its model/): train or evaluate it")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters on the language model (needs peft)")
    g.add_argument("--lora-rank", type=positive_int, default=128, help="LoRA rank r (alpha = 2r, as the official code)")
    g.add_argument("--tiny-size", default="mini", choices=["mini", "small", "base"], help="0.7M, 3.5M or 7.6M weights")
    g.add_argument("--tiny-arch", default="llava", choices=list(TINY_ARCHS), help="the tiny model's architecture")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="what the model computes "
                   "in; auto: bf16 on a GPU for a checkpoint stored in 16 bits, else fp32")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, help="recompute activations "
                   f"in the backward pass: less memory, one more forward {by_task('gradient_checkpointing')}")
    g = p.add_argument_group("generation")
    g.add_argument("--temperature", type=positive_float, default=0.2, help="sampling temperature, as the paper's")
    g.add_argument("--max-new-tokens", type=positive_int, help=f"longest answer in tokens {by_task('max_new_tokens')}")
    g.add_argument("--no-cot", action="store_true", default=None, help="answer with the action alone: the CoT ablation")
    g = p.add_argument_group("supervised warm start (SFT), the tiny model's")
    g.add_argument("--sft-steps", type=nonneg_int, help=f"SFT steps before RL, 0 with --load {by_task('sft_steps')}")
    g.add_argument("--sft-batch-size", type=positive_int, help=f"demonstrations per step {by_task('sft_batch_size')}")
    g.add_argument("--sft-lr", type=positive_float, default=1e-3, help="peak learning rate, cosine to a tenth")
    g.add_argument("--sft-warmup", type=nonneg_int, help=f"steps of linear lr warm-up {by_task('sft_warmup')}")
    g.add_argument("--sft-expert-prob", type=unit_float, help="share of demonstration actions that are the expert's, "
                   f"the rest random {by_task('sft_expert_prob')}")
    g.add_argument("--sft-restart-prob", type=unit_float, help="chance a demonstration episode starts over after a "
                   f"step: more start states to read {by_task('sft_restart_prob')}")
    g = p.add_argument_group("PPO")
    g.add_argument("--num-updates", type=nonneg_int, help=f"PPO updates, each a rollout {by_task('num_updates')}")
    g.add_argument("--num-steps", type=positive_int, help=f"steps per environment per rollout {by_task('num_steps')}")
    g.add_argument("--lr", type=positive_float, help=f"Adam learning rate, cosine to 0 over the run {by_task('lr')}")
    g.add_argument("--gamma", type=unit_float, default=0.9, help="discount, as the paper's")
    g.add_argument("--gae-lambda", type=unit_float, default=0.95, help="GAE lambda, as the paper's")
    g.add_argument("--clip-coef", type=positive_float, default=0.1, help="PPO ratio and value clip, as the paper's")
    g.add_argument("--vf-coef", type=nonneg_float, default=0.5, help="weight of the value loss")
    g.add_argument("--max-grad-norm", type=positive_float, default=1.0, help="gradient norm clip")
    g.add_argument("--update-epochs", type=positive_int, default=2, help="PPO epochs over each rollout")
    g.add_argument("--minibatch-size", type=positive_int, default=32, help="samples per optimiser step")
    g.add_argument("--micro-batch-size", type=positive_int, help=f"samples per forward {by_task('micro_batch_size')}")
    g.add_argument("--target-kl", type=positive_float, default=0.02, help="end an update once a minibatch's approximate"
                   " KL passes this, against spikes that break the JSON (ours)")
    g.add_argument("--kl-coef", type=nonneg_float, help="weight of KL(pi || pi_SFT) per answer token, which keeps the "
                   f"answer format (ours) {by_task('kl_coef')}")
    g.add_argument("--thought-coef", type=unit_float, default=0.5, help="lambda, the thought tokens' weight in log pi")
    g = p.add_argument_group("evaluation, and the run's folder")
    g.add_argument("--eval-episodes", type=nonneg_int, help=f"evaluation episodes after RL {by_task('eval_episodes')}")
    g.add_argument("--eval-start-episodes", type=nonneg_int, help="evaluation episodes after SFT, before RL "
                   f"{by_task('eval_start_episodes', like='eval_episodes')}")
    g.add_argument("--eval-envs", type=positive_int, help="evaluation episodes played at a time: only speed changes "
                   f"{by_task('eval_envs', like='num_envs')}")
    g.add_argument("--save-dir", help="the run's folder: model, metrics (default: runs/TASK-sSEED-DATE-TIME)")
    g.add_argument("--overwrite", action="store_true", help="replace the run that --save-dir holds")
    g.add_argument("--save-every", type=nonneg_int, default=10, help="updates between checkpoints (0: the last)")
    g.add_argument("--resume", metavar="RUN", help="go on with a stopped run from its checkpoint, with its own flags")
    g.add_argument("--track", action="store_true", help="write metrics and flags for TensorBoard into the run's folder")
    return p


def saved_run(path, name="rl4vlm.json"):
    """A JSON file of a folder written by this script, or {} (a bad folder is reported when loaded)."""
    try:
        with open(os.path.join(path, name)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def from_tiny(folder, depth=0):
    """Whether a model folder descends from the tiny model (rl4vlm.json, through LoRA bases), so that it
    keeps the tiny model's defaults; a folder without rl4vlm.json, or a hub id, is a real checkpoint."""
    meta = saved_run(folder)
    if "tiny" in meta or depth > 8:
        return bool(meta.get("tiny"))
    base = meta.get("base_model")
    return base == "tiny" or (bool(base) and base != folder and from_tiny(base, depth + 1))


def model_folder(path):
    """A run's folder names its model/ (what --load and load_checkpoint read); any other path is itself."""
    return os.path.join(path, "model") if os.path.isfile(os.path.join(path, "model", "rl4vlm.json")) else path


RUN_FILES = ("model", "metrics.csv", "sft.csv", "results.json")  # what a run writes into its folder


def resumed(p, given):
    """--resume RUN: the run's own arguments, as its checkpoint saved them; --device, --save-every and
    --track may change."""
    meta = saved_run(os.path.join(given.resume, "model"))
    changed = [k for k, v in vars(given).items() if v != p.get_default(k)
               and k not in ("resume", "device", "save_every", "track")]
    if "args" not in meta:
        p.error(f"no checkpoint to resume in {given.resume} (no model/ written by a run of this script)")
    if changed:
        p.error(f"--resume goes on with the run's own flags; drop --{changed[0].replace('_', '-')}")
    if saved_run(given.resume, "results.json").get("finished"):
        p.error(f"{given.resume} has finished; --load {given.resume} trains or evaluates its model further")
    keep = {k: getattr(given, k) for k in ("device", "save_every", "track") if getattr(given, k) != p.get_default(k)}
    return argparse.Namespace(**{**meta["args"], **keep, "resume": given.resume, "save_dir": given.resume})


def parse_args(argv=None):
    """The flags, checked across each other, with the task's recipe for every one not given."""
    p = make_parser()
    args = p.parse_args(argv)
    if args.resume:
        return resumed(p, args)
    args.load = args.load and model_folder(args.load)
    saved = saved_run(args.load) if args.load else {}  # a loaded model goes on with its own task and format
    args.task = args.task or (saved.get("task") if saved.get("task") in envs.TASKS else "numberline")
    args.no_cot = saved.get("cot") is False if args.no_cot is None else args.no_cot
    args.tiny = from_tiny(args.load) if args.load else args.model == "tiny" or from_tiny(args.model)
    defaults = recipe(args.task, args.tiny)
    if args.load or args.model != "tiny":
        defaults["sft_steps"] = 0  # a trained model, or a real one, starts RL as it is
    if args.eval_episodes is not None:  # a --eval-episodes given counts before RL too
        defaults["eval_start_episodes"] = None
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.eval_start_episodes = args.eval_episodes if args.eval_start_episodes is None else args.eval_start_episodes
    args.eval_envs = args.eval_envs or args.num_envs
    if args.minibatch_size % min(args.micro_batch_size, args.minibatch_size):
        p.error("--minibatch-size must be a multiple of --micro-batch-size")
    if args.lora and args.model == "tiny" and args.load is None:  # an adapter's base must load again from disk
        p.error("--lora needs a base model saved on disk: train the tiny one first (--num-updates 0 --save-dir "
                "runs/tiny-sft), then pass --model runs/tiny-sft --lora")
    arch = f"-{args.tiny_arch}" if args.model == "tiny" and args.tiny_arch != "llava" and not args.load else ""
    name = f"{args.task}{arch}{'-nocot' if args.no_cot else ''}-s{args.seed}{'-load' if args.load else ''}"
    args.save_dir = args.save_dir or os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(args.save_dir) and not os.path.isdir(args.save_dir):
        p.error(f"--save-dir {args.save_dir} is a file, not a folder")
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(args.save_dir, f))]
    if held and not args.overwrite and os.environ.get("RANK", "0") == "0":
        p.error(f"{args.save_dir} holds a run ({held[0]}): --resume {args.save_dir} goes on with it, "
                "--overwrite replaces it")
    return args


if __name__ == "__main__":
    sys.modules.setdefault("rl4vlm", sys.modules[__name__])  # tools that import rl4vlm find this script, not a copy
    ARGS = parse_args()

import numpy as np  # noqa: E402  (heavy imports after parsing, see above)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import huggingface_hub  # noqa: E402  (a dependency of transformers)
import transformers  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402  (a dependency of transformers)
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, GenerationConfig  # noqa: E402

transformers.utils.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)  # from peft
transformers.utils.logging.disable_progress_bar()
RANK, WORLD = 0, 1  # this process's place in a torchrun job (init_distributed); a single process: 0 of 1


def log(message):
    if RANK == 0:  # one process speaks for the job
        tqdm.write(message)  # above the progress bar


# ----------------------------------------------------------------------------------------------
# Prompts (paper Fig. 3): the task, the legal actions, and the JSON format with the task's
# chain-of-thought fields first, "thoughts" next and "action" last. The task's own words are its env
# class's (envs.py: instructions, prompt_state, state_fields, thoughts).

def build_prompt(task, action_names, info, cot=True):
    """The user prompt for one step. `info` is the env's info dict (it holds the formula so far)."""
    game = envs.TASKS[task]
    lines = [game.instructions, game.prompt_state(info)]
    lines.append("Legal actions: " + ", ".join(f'"{a}"' for a in action_names) + ".")
    if cot:
        fields = ", ".join(f'"{k}": ...' for k in game.state_fields(info))
        lines.append("Answer with one JSON object: {" + fields + ', "thoughts": "...", "action": "..."}. '
                     "Read the image into the first fields, think, then give exactly one legal action.")
    else:
        lines.append('Answer with one JSON object: {"action": "..."} holding exactly one legal action.')
    return "\n".join(line for line in lines if line)


def format_response(task, info, action_name, cot=True):
    """A well-formed answer: what SFT demonstrations teach, and what parse_action reads best. The thoughts
    read the state and relate its numbers; in NumberLine and Blackjack never what to do, which is left
    to RL and is what the paper's CoT ablation measures."""
    game = envs.TASKS[task]
    answer = {**game.state_fields(info), "thoughts": game.thoughts(info)} if cot else {}
    answer["action"] = action_name
    return json.dumps(answer)


# ----------------------------------------------------------------------------------------------
# Action parsing: text -> the index of the one legal action it chooses, or None.

MAX_PARSE_CHARS = 8192  # answers are at most --max-new-tokens long; bound the work on any input


def _legal_index(value, action_names):
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    if isinstance(value, float):  # {"action": 5.0} means "5"
        value = str(int(value)) if value.is_integer() else str(value)
    value = str(value).strip().strip("\"'").strip().lower()
    hits = [i for i, name in enumerate(action_names) if name.lower() == value]
    return hits[0] if len(hits) == 1 else None


def _json_objects(text):
    """Every top-level {...} in the text that json can read, trying light repairs of model output."""
    variants = [text, re.sub(r",\s*([}\]])", r"\1", text)]  # trailing commas
    if '"' not in text:
        variants.append(variants[1].replace("'", '"'))  # single quotes, as Python's repr writes them
    decoder = json.JSONDecoder()
    for variant in variants:
        objects, i = [], variant.find("{")
        for _ in range(64):  # at most 64 attempts: "{{{{..." cannot make this quadratic
            if i < 0:
                break
            try:
                obj, end = decoder.raw_decode(variant, i)
                objects.append(obj)
                i = variant.find("{", end)
            except (ValueError, RecursionError):
                i = variant.find("{", i + 1)
        dicts = [o for o in objects if isinstance(o, dict)]
        if dicts:
            return dicts
    return []


# The action key, the one definition that parsing (which value is the action) and scoring (where the
# action tokens start, action_start) share: "action", 'action' or a bare action, any case, then ":".
ACTION_KEY = r"""(?:["']\s*)?\baction\b\s*["']?\s*:"""
_ACTION_VALUE = re.compile(ACTION_KEY + r"""\s*("[^"]*"|'[^']*'|[^,}\n]*)""", re.IGNORECASE)


def parse_action(text, action_names):
    """Index of the legal action the answer chooses, or None (no action, or more than one). JSON first
    (code fences, text around it, single quotes, trailing commas, numbers for strings are fine; the action
    key in any case); else the values written after an ACTION_KEY must name one legal action. Never raises."""
    if not isinstance(text, str):
        return None
    text = text[:MAX_PARSE_CHARS]
    chosen = set()
    for obj in _json_objects(text):
        for key, value in obj.items():
            if isinstance(key, str) and key.strip().lower() == "action":
                chosen.add(_legal_index(value, action_names))
    if not chosen:
        chosen = {_legal_index(v, action_names) for v in _ACTION_VALUE.findall(text)}
    chosen.discard(None)
    return chosen.pop() if len(chosen) == 1 else None


# ----------------------------------------------------------------------------------------------
# The model: the VLM policy, its value head and the KL reference. The tiny LLaVA (built offline, see
# the appendix) and a real checkpoint of any family go through the same transformers classes.

def make_value_head(hidden_size):
    """The value head (paper Sec. 4.2: an MLP; its widths are the official code's, hidden -> 1024 -> 512
    -> 1) on the VLM's last-layer hidden state at the last prompt token."""
    return torch.nn.Sequential(torch.nn.Linear(hidden_size, 1024), torch.nn.ReLU(),
                               torch.nn.Linear(1024, 512), torch.nn.ReLU(), torch.nn.Linear(512, 1))


def text_hidden_size(model):
    return getattr(model.config, "text_config", model.config).hidden_size


# All that differs between VLM families at run time, one entry per model_type (unlisted: LLaVA's defaults):
# processor class; image_only: it wants a video processor (torchvision), use it without; vision, text: the
# encoder's (frozen in RL) and language model's (LoRA's) module names; patches: the (B, 3) field counting
# each image's rows of pixel_values; refused: why this code cannot train it (one line, not wrong numbers).
FAMILIES = {
    "llava": {},
    "llava_next": {"processor": "LlavaNextProcessor"},
    "qwen2_vl": {"processor": "Qwen2VLProcessor", "image_only": True, "vision": "visual", "patches": "image_grid_thw"},
    "qwen2_5_vl": {"processor": "Qwen2_5_VLProcessor", "image_only": True, "vision": "visual",
                   "patches": "image_grid_thw"},
    "qwen3_vl": {"processor": "Qwen3VLProcessor", "image_only": True, "vision": "visual", "patches": "image_grid_thw"},
    "idefics3": {"processor": "Idefics3Processor", "vision": "vision_model", "text": "text_model"},  # and SmolVLM v1
    "gemma3": {"processor": "Gemma3Processor"},
    "paligemma": {"refused": "PaliGemma's token_type_ids must be 1 over the answer (0 lets the prompt attend to it)"},
}


def family(model):
    return FAMILIES.get(model.config.model_type, {})


def add_lora(model, rank):
    try:
        import peft
    except ImportError:
        sys.exit("rl4vlm.py: error: --lora needs peft: pip install peft")
    # the language model's projections only (the vision tower stays frozen); no dropout: PPO's first ratio is 1
    text = family(model).get("text", "language_model")
    targets = rf".*{text}.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets)
    return peft.get_peft_model(model, config)


def freeze_vision(model):
    """RL trains the language model, the projector and the value head; the vision encoder keeps SFT's
    reading (Qwen's projector, `visual.merger`, is part of its encoder and stays frozen with it)."""
    vision = family(model).get("vision", "vision_tower")  # Qwen: visual, Idefics3: vision_model
    for name, p in model.named_parameters():
        if vision in name.split("."):
            p.requires_grad_(False)


def rl_optimizer(agent, args):
    """Adam over what RL trains: the language model (or its LoRA adapter), the projector, the value head."""
    freeze_vision(agent.model)
    params = [p for p in agent.model.parameters() if p.requires_grad] + list(agent.value_head.parameters())
    return torch.optim.Adam(params, lr=args.lr, eps=1e-5)


def make_reference(model):
    """The SFT policy for --kl-coef, the policy as RL starts: a frozen copy; for LoRA the model itself with
    a second adapter, "reference", a copy of the trained one (the base held once; adapters off would be
    the model before SFT)."""
    if not hasattr(model, "peft_config"):  # in the dtype it computes in: bf16 in 16 bits
        return copy.deepcopy(model).to(computes_in(model)).eval().requires_grad_(False)
    import peft
    model.add_adapter("reference", model.peft_config["default"])  # added frozen; "default" stays active
    peft.set_peft_model_state_dict(model, peft.get_peft_model_state_dict(model, adapter_name="default"),
                                   adapter_name="reference")
    return model


@dataclasses.dataclass
class Agent:
    """The policy and what goes with it, as every phase below uses them."""
    model: object              # the VLM (a peft model with --lora)
    processor: object          # prompts + images -> model inputs; .tokenizer
    value_head: torch.nn.Module
    device: torch.device
    base_model: str            # what a LoRA adapter of the model loads onto (saved in rl4vlm.json)
    ref: object = None         # the SFT policy for --kl-coef (make_reference), set as RL starts


# ----------------------------------------------------------------------------------------------
# Generation: one batched, left-padded generate call for all environments.

def placeholder_ids(model):
    """The tokens that stand for image (and video) features: never sampled, masked in scoring too."""
    ids = (getattr(model.config, "image_token_id", None), getattr(model.config, "video_token_id", None))
    return [i for i in ids if i is not None]


def end_tokens(model, tokenizer):
    """Every token that ends an answer: the checkpoint's own list (Gemma 3 IT ends a turn with
    <end_of_turn>, Qwen's Instruct models with <|im_end|> or <|endoftext|>) and the tokenizer's EOS."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted(set(ids) | ({tokenizer.eos_token_id} - {None}))


def generation_config(model, processor, args):
    tok = processor.tokenizer
    # Plain sampling from softmax(logits / T), nothing else (load_vlm drops a checkpoint's own defaults,
    # Qwen's repetition_penalty): the log-probs scored are the ones sampled from. The image token is
    # suppressed (a later forward would read it as an image slot); scoring masks it the same way.
    return GenerationConfig(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
                            max_new_tokens=args.max_new_tokens, suppress_tokens=placeholder_ids(model),
                            pad_token_id=tok.pad_token_id, eos_token_id=end_tokens(model, tok),
                            return_dict_in_generate=True)


@torch.no_grad()
def generate(model, inputs, gen_config, for_ppo=True):
    """-> the response ids of each row, cut after its first end token; each sampled token's log-prob under
    softmax(logits / T), (B, R); the last layer's hidden state at the last prompt token, (B, H). The last
    two, what PPO stores (old log pi, V(s)), come off generate's own forward passes and agree with score()
    in fp32 to float rounding (tested); for_ppo=False skips them (gigabytes of logits for a 7B model)."""
    if for_ppo:  # in the config, not as arguments beside it (transformers warns about mixing the two)
        gen_config = copy.deepcopy(gen_config)
        gen_config.output_logits = gen_config.output_hidden_states = True
    with autocast(model):
        out = model.generate(**inputs, generation_config=gen_config)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]  # (B, R)
    token_logp = hidden = None
    if for_ppo:
        logits = torch.stack(out.logits, 1).float() / gen_config.temperature  # (B, R, V), raw logits / T
        logits[..., placeholder_ids(model)] = -1e9  # suppressed in sampling, masked so in scoring too
        token_logp = torch.log_softmax(logits, -1).gather(-1, new[..., None])[..., 0].cpu()  # (B, R)
        hidden = out.hidden_states[0][-1][:, -1]  # the prefill pass, last layer, last (left-padded) prompt token
    responses = []
    for row in new.cpu():
        eos = torch.isin(row, torch.tensor(gen_config.eos_token_id)).nonzero()
        responses.append(row[: eos[0, 0] + 1] if len(eos) else row)
    return responses, token_logp, hidden


# ----------------------------------------------------------------------------------------------
# Scoring: the lambda-scaled log-prob of an answer and the state value, in one forward pass.

def answer_masks(samples, R):
    """(B, R) masks of each answer's thought tokens and its action tokens; 0 on padding."""
    thought_mask, action_mask = torch.zeros((len(samples), R)), torch.zeros((len(samples), R))
    for i, s in enumerate(samples):
        r, a = len(s["response_ids"]), s["action_start"]
        thought_mask[i, :min(a, r)] = 1
        action_mask[i, a:r] = 1
    return thought_mask, action_mask


def action_start(tokenizer, response_ids):
    """Index of the first action token, the one holding the start of the last ACTION_KEY, found by decoding
    prefixes of the sampled ids (re-tokenizing the text could split it otherwise). Without an action key
    the whole answer counts as thoughts: no token of it chose the action (a random one was played)."""
    return _action_start(tokenizer, tuple(int(i) for i in response_ids))


@functools.lru_cache(maxsize=4096)  # answers repeat (a demonstration, a solved state): decode each once
def _action_start(tokenizer, ids):
    def decode(k):
        return tokenizer.decode(ids[:k], skip_special_tokens=True, clean_up_tokenization_spaces=False)

    text = decode(len(ids))
    keys = list(re.finditer(ACTION_KEY, text, re.IGNORECASE))
    if not keys:
        return len(ids)
    head = text[:keys[-1].start() + 1]  # the answer up to the key's first character
    # the first token whose prefix decodes to all of head (not to as many characters: a byte-fallback
    # tokenizer decodes a cut character to one replacement character per byte)
    lo, hi = 0, len(ids) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if decode(mid + 1).startswith(head):
            hi = mid
        else:
            lo = mid + 1
    return lo


def token_logprobs(model, batch, temperature):
    """-> log-softmax over the vocabulary at every answer position (B, R, V) and the hidden state at
    the last prompt token (B, H)."""
    R = batch["thought_mask"].shape[1]
    P = batch["input_ids"].shape[1] - R
    inputs = {k: v for k, v in batch.items() if k not in ("thought_mask", "action_mask")}
    # no position ids: the model makes its own from the mask (Qwen's 3-D ones too, which 1-D ones get wrong)
    with autocast(model):
        out = model(**inputs, output_hidden_states=True, logits_to_keep=R + 1, use_cache=False)  # no KV cache kept
    logits = out.logits[:, :-1].float() / temperature  # (B, R, V): column j predicts answer token j
    # Suppressed in generate too; a finite floor keeps the KL below free of inf - inf.
    logits[..., placeholder_ids(model)] = -1e9
    hidden = out.hidden_states[-1][:, P - 1]  # (B, H)
    return torch.log_softmax(logits, dim=-1), hidden


def answer_logp(logprobs, batch):
    """The log-probs of the answer's own tokens: (B, R, V) -> (B, R)."""
    answer = batch["input_ids"][:, batch["input_ids"].shape[1] - logprobs.shape[1]:]  # (B, R)
    return logprobs.gather(-1, answer[..., None])[..., 0]


def lambda_log_pi(logp, thought_mask, action_mask, thought_coef):
    """The paper's action log-prob (Sec. 4.2): thought_coef * sum of the thought tokens' log-probs + sum of
    the action tokens' (from the action key on), (B, R) -> (B,). An answer of five tokens at thought_coef 0.5:
        token            ' {"thoughts":'  ' "up",'  ' "action":'  ' "'   '+"}'
        log p                 -0.2          -0.4       -0.1        -0.0   -0.3
        thought / action    thought       thought     action      action  action
        log pi = 0.5 * (-0.2 - 0.4) + (-0.1 - 0.0 - 0.3) = -0.7
    """
    logp = logp.masked_fill((thought_mask + action_mask) == 0, 0.0)  # padding may hold any value
    return thought_coef * (logp * thought_mask).sum(1) + (logp * action_mask).sum(1)


def score(model, value_head, batch, temperature, thought_coef, ref_logprobs=None):
    """log pi(a|s) = thought_coef * sum log p(thought tokens) + sum log p(action tokens), V(s), and,
    given the reference's log-probs, KL(pi || pi_ref) per answer token, averaged over the answer's tokens."""
    logprobs, hidden = token_logprobs(model, batch, temperature)  # (B, R, V), (B, H)
    log_pi = lambda_log_pi(answer_logp(logprobs, batch), batch["thought_mask"], batch["action_mask"], thought_coef)
    mask = batch["thought_mask"] + batch["action_mask"]  # (B, R): 0 on padding
    value = value_head(hidden.float())[:, 0]
    kl = None
    if ref_logprobs is not None:  # exact KL over the vocabulary at each position, not a sampled estimate
        kl_tokens = (logprobs.exp() * (logprobs - ref_logprobs)).sum(-1)  # (B, R)
        kl = (kl_tokens * mask).sum(1) / mask.sum(1).clamp(min=1)
    return log_pi, value, kl  # (B,), (B,), (B,) or None


@torch.no_grad()
def reference_logprobs(model, ref, batch, temperature):
    """The SFT policy's log-probs (B, R, V) from make_reference's frozen copy, or for LoRA from the
    model with its "reference" adapter in place of the trained one."""
    if ref is not model:
        return token_logprobs(ref, batch, temperature)[0]
    model.set_adapter("reference")
    try:
        return token_logprobs(model, batch, temperature)[0]
    finally:
        model.set_adapter("default")  # also makes "default" the trainable adapter again


@torch.no_grad()
def state_values(agent, args, action_names, states):
    """V(s) for {env index: (obs, info)}: one forward over the prompts alone -> (len(states),)."""
    prompts = [build_prompt(args.task, action_names, info, not args.no_cot) for _, info in states.values()]
    inputs = process(agent.processor, prompts, [obs for obs, _ in states.values()], agent.device)
    tok = agent.processor.tokenizer
    samples = [make_sample(inputs, i, torch.zeros(0, dtype=torch.long), tok) for i in range(len(prompts))]
    batch = collate(samples, tok.pad_token_id, agent.device)
    return score(agent.model, agent.value_head, batch, args.temperature, args.thought_coef)[1].float().cpu()


# ----------------------------------------------------------------------------------------------
# Environments in parallel (envs.EnvPool), each with its own image, prompt and answer per step.

def prompts(pool, cot):
    """The prompt of each env still playing in the pool."""
    return [build_prompt(pool.task, pool.action_names, pool.infos[i], cot) for i in pool.active]


def choose_actions(texts, action_names, rng):
    """Parse each answer; an answer with no single legal action plays a uniformly random one."""
    actions, invalid = [], []
    for t in texts:
        a = parse_action(t, action_names)
        invalid.append(a is None)
        actions.append(rng.randrange(len(action_names)) if a is None else a)
    return actions, invalid


# ----------------------------------------------------------------------------------------------
# Supervised warm start (the paper starts RL from an SFT checkpoint): demonstrations made on the fly.

def sft_learning_rate(step, steps, peak, warmup=0):
    """The SFT learning rate at `step` of `steps`: a linear rise over the first `warmup` steps, times a
    cosine from `peak` down to 10% of it."""
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))) * min(1.0, (step + 1) / max(warmup, 1))


def sft(agent, args, run):
    """Cross-entropy on demonstrations (sft_step), --sft-steps of them, then the reading probe: while a field
    of what the image shows is misread, SFT goes on (check_reading)."""
    rng, t0, encoded = random.Random(rank_seed(args.seed + 1)), time.time(), {}  # encoded: answer text -> its ids
    B = args.sft_batch_size
    pool = envs.EnvPool(args.task, [envs.episode_seed("sft", RANK * B + i, args.seed) for i in range(B)])  # per process
    optimizer = torch.optim.AdamW([p for p in agent.model.parameters() if p.requires_grad], lr=args.sft_lr,
                                  weight_decay=0.0)
    start, pool = restore(agent, run, "sft", optimizer, rng, pool)  # --resume: the step to go on from
    agent.model.train()
    end = args.sft_steps + run.results.get("sft_extra", 0)
    while start < end:
        for step in progress(range(start, end), "sft", start, end):
            lr = sft_learning_rate(min(step, args.sft_steps), args.sft_steps, args.sft_lr, args.sft_warmup)
            loss = sft_step(agent, args, pool, optimizer, rng, lr, encoded)
            if (step + 1) % 50 == 0 or step == 0:
                log(f"sft {step + 1}/{end} | loss {loss:.4f} | lr {lr:.2e} | {eta(step + 1)}")
                write_row(run, "sft.csv", ["step", "loss", "lr"], {"step": step + 1, "loss": loss, "lr": lr}, step == 0)
                track({"sft/loss": loss, "sft/lr": lr}, step + 1)
            checkpoint(agent, args, run, "sft", step + 1, optimizer, rng, pool)  # at the last step, and at a stop
        start, end = end, args.sft_steps + check_reading(agent, args, run)
    run.results["sft_seconds"] = run.results.get("sft_seconds", 0) + time.time() - t0
    log(f"sft done in {time.time() - t0:.0f} s")


def sft_step(agent, args, pool, optimizer, rng, lr, encoded):
    """One SFT step on a demonstration per env: thoughts from the true state, the expert's action with
    probability --sft-expert-prob (else a random one); then each episode starts over with probability
    --sft-restart-prob (a formula game's formula so far names the cards played: only start states need
    reading). -> the loss, the mean over every process's answer tokens."""
    model, tok = agent.model, agent.processor.tokenizer
    for group in optimizer.param_groups:
        group["lr"] = lr
    actions = [env.expert_action() if rng.random() < args.sft_expert_prob else rng.randrange(len(pool.action_names))
               for env in pool.envs]
    answers = [" " + format_response(args.task, info, pool.action_names[a], not args.no_cot)
               for info, a in zip(pool.infos, actions)]
    inputs = process(agent.processor, prompts(pool, not args.no_cot), pool.observations(), agent.device)
    if len(encoded) > 4096:  # the formula games' answers rarely repeat: keep the store small
        encoded.clear()
    for ans in set(answers) - set(encoded):  # each different answer tokenized once
        encoded[ans] = tok(ans, add_special_tokens=False).input_ids + [tok.eos_token_id]
    samples = [make_sample(inputs, i, torch.tensor(encoded[ans]), tok) for i, ans in enumerate(answers)]
    tokens = all_mean([sum(len(s["response_ids"]) for s in samples)], agent.device)[0] * WORLD
    loss, params = 0.0, [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    for m in range(0, len(samples), args.micro_batch_size):  # gradients accumulated over micro-batches
        batch = collate(samples[m:m + args.micro_batch_size], tok.pad_token_id, agent.device)
        logp = answer_logp(token_logprobs(model, batch, temperature=1.0)[0], batch)
        part = -(logp * (batch["thought_mask"] + batch["action_mask"])).sum() / tokens
        part.backward()
        loss += part.item()
    loss = all_mean([loss], agent.device)[0] * WORLD
    if not math.isfinite(loss):  # the same in every process
        raise FloatingPointError(f"SFT loss is {loss}")
    sum_gradients(params)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    pool.step(actions)
    for i in range(len(pool.envs)):
        if args.sft_restart_prob > 0 and rng.random() < args.sft_restart_prob:
            pool.restart(i)
    return loss


# ----------------------------------------------------------------------------------------------
# Rollouts (paper Algorithm 1): T steps of N environments, each step prompt + image -> answer ->
# action, stored with what PPO needs.

@dataclasses.dataclass
class Rollout:
    """One update's experience, T steps x N environments; samples are in step order (t * N + i)."""
    samples: list             # T * N contexts: prompt ids, image tensors, answer ids, action start
    log_pi: torch.Tensor      # (T, N) the lambda-scaled log pi of each answer as it was sampled (old log pi)
    values: torch.Tensor      # (T, N) V(s_t)
    rewards: torch.Tensor     # (T, N)
    terminated: torch.Tensor  # (T, N) bool: the game ended (nothing follows)
    truncated: torch.Tensor   # (T, N) bool: a time limit ended the episode (bootstrap from final_values)
    final_values: torch.Tensor  # (T, N) V of the last observation of an episode truncated at step t
    last_values: torch.Tensor   # (N,) V of the state after the last step
    finished: list            # returns of the episodes that ended during the rollout
    invalid: list             # per answer: it named no single legal action (a random one was played)
    example: str = ""         # the first answer and the action it became, for the log
    shape: tuple = None       # in 16 bits, (rows, P, R) of every scoring batch (rescore)


@torch.no_grad()
def collect_rollout(agent, pool, gen_config, args, rng, timer):
    """Play T = --num-steps steps in every environment of the pool with the current policy. Old log pi and
    V(s) come off generate's own forward passes in fp32 (what score() gives, to float rounding: tested),
    and from a second forward in 16 bits (rescore)."""
    T, N, tok, model = args.num_steps, len(pool.envs), agent.processor.tokenizer, agent.model
    exact = computes_in(model) == torch.float32
    ro = Rollout([], torch.zeros(T, N), torch.zeros(T, N), torch.zeros(T, N), torch.zeros(T, N, dtype=torch.bool),
                 torch.zeros(T, N, dtype=torch.bool), torch.zeros(T, N), torch.zeros(N), [], [])
    model.eval()
    for t in range(T):
        with timer("prompt"):
            inputs = process(agent.processor, prompts(pool, not args.no_cot), pool.observations(), agent.device)
        with timer("generate"):
            responses, token_logp, hidden = generate(model, inputs, gen_config, exact)  # N answers, (N, R), (N, H)
        with timer("score"):  # parse the answers; old log pi and V(s) from generate's outputs
            texts = tok.batch_decode(responses, skip_special_tokens=True)
            actions, bad = choose_actions(texts, pool.action_names, rng)
            step_samples = [make_sample(inputs, i, responses[i], tok) for i in range(N)]
            if exact:
                ro.log_pi[t] = lambda_log_pi(token_logp, *answer_masks(step_samples, token_logp.shape[1]),
                                             args.thought_coef)
                ro.values[t] = agent.value_head(hidden.float())[:, 0].cpu()
            ro.samples += step_samples
            ro.invalid += bad
        if t == 0:
            ro.example = f"{texts[0]!r} -> {pool.action_names[actions[0]]!r}{' (invalid: random)' if bad[0] else ''}"
        with timer("env"):
            r, term, trunc, finals, done_returns = pool.step(actions)
            ro.rewards[t], ro.terminated[t], ro.truncated[t] = torch.tensor(r), torch.tensor(term), torch.tensor(trunc)
            ro.finished += done_returns
        if finals:  # truncated episodes bootstrap from the value of their last observation
            with timer("score"):
                ro.final_values[t, list(finals)] = state_values(agent, args, pool.action_names, finals)
    with timer("score"):
        ro.last_values[:] = state_values(agent, args, pool.action_names,
                                         {i: (pool.obs[i], pool.infos[i]) for i in range(N)})
        if not exact:
            rescore(agent, ro, args)
    return ro


def rescore(agent, ro, args):
    """Old log pi and V(s) from the very forward PPO's update makes: in 16 bits generate's cached decode, and
    forwards of other shapes, round differently, by more than the 0.1 clip tolerates. Every batch is padded
    to one shape (ro.shape: rows, P, R; the update's too), so a sample's scores do not depend on its batch."""
    samples = ro.samples
    ro.shape = (args.micro_batch_size, max(len(s["prompt_ids"]) for s in samples),
                max(len(s["response_ids"]) for s in samples))
    log_pi, values = torch.zeros(len(samples)), torch.zeros(len(samples))
    for i in range(0, len(samples), args.micro_batch_size):
        chunk = samples[i:i + args.micro_batch_size]
        batch = collate(chunk, agent.processor.tokenizer.pad_token_id, agent.device, ro.shape)
        lp, v, _ = score(agent.model, agent.value_head, batch, args.temperature, args.thought_coef)
        log_pi[i:i + len(chunk)], values[i:i + len(chunk)] = lp[:len(chunk)].float().cpu(), v[:len(chunk)].float().cpu()
    ro.log_pi, ro.values = log_pi.view(ro.log_pi.shape), values.view(ro.values.shape)


# ----------------------------------------------------------------------------------------------
# GAE (Schulman et al. 2016), bootstrapping through truncation but not through termination.

def compute_gae(rewards, values, terminated, truncated, final_values, last_values, gamma, gae_lambda):
    """rewards, values, terminated, truncated, final_values: (T, N); last_values: (N,).

    values[t] is V(s_t); final_values[t] is V of the last observation of an episode truncated at
    step t (its next state, which the reset replaced); last_values is V of the state after step T-1.
    Returns advantages and returns, (T, N).
    """
    T = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(last_values)
    for t in reversed(range(T)):
        next_values = last_values if t == T - 1 else values[t + 1]
        next_values = torch.where(truncated[t], final_values[t], next_values)  # truncated: V(final obs)
        next_values = next_values * (~terminated[t])  # terminated: nothing after it
        episode_goes_on = ~(terminated[t] | truncated[t])
        delta = rewards[t] + gamma * next_values - values[t]
        last_gae = delta + gamma * gae_lambda * episode_goes_on * last_gae
        advantages[t] = last_gae
    return advantages, advantages + values


# ----------------------------------------------------------------------------------------------
# The PPO update (paper Sec. 4.2, Schulman et al. 2017): the clipped surrogate on the lambda-scaled
# log pi and the clipped value loss; then, marked as ours, the KL to the SFT policy.

def ppo_loss(agent, batch, old, args):
    """The loss of one micro-batch; old: its samples' old log pi, old V(s), advantages and returns, (B,)
    each. -> the loss, and its parts as numbers."""
    old_lp, old_v, adv, ret = old
    # ours, for the KL term: the SFT policy's log-probs of this micro-batch only, (B, R, V), so that
    # memory grows with the micro-batch, not with the rollout (one more forward, without gradients)
    ref = None if agent.ref is None else reference_logprobs(agent.model, agent.ref, batch, args.temperature)
    log_pi, value, ref_kl = (x if x is None else x[:len(adv)] for x in  # a 16-bit batch's padding rows dropped
                             score(agent.model, agent.value_head, batch, args.temperature, args.thought_coef, ref))
    # --- the paper's loss: PPO's clipped surrogate and clipped value loss
    log_ratio = log_pi - old_lp
    ratio = log_ratio.exp()
    policy_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
    value_clipped = old_v + (value - old_v).clamp(-args.clip_coef, args.clip_coef)
    value_loss = 0.5 * torch.max((value - ret) ** 2, (value_clipped - ret) ** 2).mean()
    loss = policy_loss + args.vf_coef * value_loss
    # --- ours, not the paper's: KL(pi || pi_SFT) per answer token keeps the answer format
    if ref_kl is not None:
        loss = loss + args.kl_coef * ref_kl.mean()
    with torch.no_grad():
        parts = {"policy_loss": policy_loss.item(), "value_loss": value_loss.item(),
                 "approx_kl": ((ratio - 1) - log_ratio).mean().item(),
                 "clip_frac": ((ratio - 1).abs() > args.clip_coef).float().mean().item()}
    return loss, parts if ref_kl is None else {**parts, "ref_kl": ref_kl.mean().item()}


def normalize(advantages):
    """Advantages to mean 0 and std 1 over all processes' samples (one sample has no spread to divide by)."""
    every = torch.tensor(gather(advantages.tolist())) if WORLD > 1 else advantages
    return (advantages - every.mean()) / (every.std() + 1e-8) if len(every) > 1 else advantages


def ppo_update(agent, optimizer, rollout, advantages, returns, args, rng):
    """--update-epochs passes over the rollout in minibatches of --minibatch-size, each forward over
    --micro-batch-size samples with gradients accumulated. advantages, returns: (T, N)."""
    samples, n = rollout.samples, len(rollout.samples)
    old_log_pi, old_values = rollout.log_pi.flatten(), rollout.values.flatten()  # (T * N,)
    advantages, returns = normalize(advantages.flatten()), returns.flatten()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stats, order = collections.defaultdict(list), list(range(n))

    def minibatches():  # each epoch shuffles the rollout once, lazily: an early stop shuffles no more
        for _ in range(args.update_epochs):
            rng.shuffle(order)
            yield from (order[start:start + args.minibatch_size] for start in range(0, n, args.minibatch_size))

    agent.model.train()
    for minibatch in minibatches():
        optimizer.zero_grad(set_to_none=True)
        bad = ""  # a loss that is not finite
        for m in range(0, len(minibatch), args.micro_batch_size):
            idx = minibatch[m:m + args.micro_batch_size]
            batch = collate([samples[i] for i in idx], agent.processor.tokenizer.pad_token_id, agent.device,
                            rollout.shape)
            old = [x[idx].to(agent.device) for x in (old_log_pi, old_values, advantages, returns)]
            loss, parts = ppo_loss(agent, batch, old, args)
            for k, v in parts.items():
                stats[k].append(v)
                bad = bad or ("" if math.isfinite(v) else f"{k.replace('_', ' ')} is {v}")
            (loss * len(idx) / (len(minibatch) * WORLD)).backward()  # the mean over all processes' minibatches
        # Decided on numbers all processes share, so that all stop together: a non-finite loss anywhere,
        # and (ours too, CleanRL's target_kl) a minibatch that shows the policy moved this far.
        kl = np.mean(stats["approx_kl"][-math.ceil(len(minibatch) / args.micro_batch_size):])
        approx_kl, any_bad = all_mean([kl, float(bool(bad))], agent.device)
        if any_bad:
            raise FloatingPointError(bad or "a loss is not finite in another process")
        sum_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        if approx_kl > args.target_kl:
            break
    return {k: float(np.mean(stats[k])) if stats[k] else 0.0
            for k in ("policy_loss", "value_loss", "approx_kl", "clip_frac", "ref_kl")}


# ----------------------------------------------------------------------------------------------
# Evaluation on fixed episodes (never used for training or tuning), and the reading probe.

def sample_answers(agent, gen_config, prompts, images):
    """Prompts + images -> the sampled answers' texts, one batched generate (no PPO numbers kept)."""
    inputs = process(agent.processor, prompts, images, agent.device)
    responses = generate(agent.model, inputs, gen_config, for_ppo=False)[0]
    return agent.processor.tokenizer.batch_decode(responses, skip_special_tokens=True)


@torch.no_grad()
def evaluate(agent, args, episodes):
    """Success rate (return > 0, the paper's metric), mean return and invalid-answer rate over the fixed
    evaluation episodes 0 .. episodes - 1, --eval-envs at a time (each process every WORLD-th). A forked
    RNG: the same noise for every evaluation, and the training's random stream left where it was."""
    with torch.random.fork_rng(devices=[agent.device] if agent.device.type == "cuda" else []):
        torch.manual_seed(rank_seed(args.seed))
        agent.model.eval()
        rng, gen_config = random.Random(rank_seed(args.seed)), generation_config(agent.model, agent.processor, args)
        seeds = [envs.episode_seed("evaluation", j) for j in range(RANK, episodes, WORLD)]
        n = min(args.eval_envs, len(seeds))
        pool = envs.EnvPool(args.task, seeds[:n], queue=iter(seeds[n:]))
        returns, invalid = [], []
        while pool.active:
            texts = sample_answers(agent, gen_config, prompts(pool, not args.no_cot), pool.observations())
            actions, bad = choose_actions(texts, pool.action_names, rng)
            invalid += bad
            returns += pool.step(actions)[4]
    returns, invalid = np.array(gather(returns)), gather(invalid)
    return {"success": float((returns > 0).mean()), "return": float(returns.mean()),
            "invalid": float(np.mean(invalid)) if invalid else 0.0, "episodes": len(returns)}


PROBE_STATES = 96  # the reading probe's start states: one misread state in 96 is sampling's luck


@torch.no_grad()
def read_probe(agent, args, states=PROBE_STATES, batch=16):
    """Does the model read the image? Its answers at `states` start states that no run trains or evaluates
    on, sampled with a forked RNG as evaluate's. -> (field_shares, answers, the states' infos)."""
    with torch.random.fork_rng(devices=[agent.device] if agent.device.type == "cuda" else []):
        torch.manual_seed(0)
        agent.model.eval()
        gen_config = generation_config(agent.model, agent.processor, args)
        pool = envs.EnvPool(args.task, [envs.episode_seed("probe", i) for i in range(states)])
        asked, answers = prompts(pool, cot=True), []
        for i in range(0, states, batch):
            answers += sample_answers(agent, gen_config, asked[i:i + batch], pool.obs[i:i + batch])
    return field_shares(args.task, answers, pool.infos), answers, pool.infos


def field_shares(task, answers, infos):
    """The share of answers whose state fields (their first JSON fields: what the image shows) are exactly
    the env's true values, {field: share}; an answer that is not JSON, or lacks the field, is wrong."""
    right = collections.Counter()
    for text, info in zip(answers, infos):
        said = (_json_objects(text) or [{}])[0]
        right.update(f for f, true in envs.TASKS[task].state_fields(info).items() if said.get(f) == true)
    return {f: right[f] / len(infos) for f in envs.TASKS[task].state_fields(infos[0])}


# ----------------------------------------------------------------------------------------------
# Main: model -> SFT -> evaluate -> [rollout -> GAE -> PPO update -> log] x num_updates -> evaluate

def main(args):
    device = init_distributed(args)
    for seed in (random.seed, np.random.seed, torch.manual_seed):
        seed(rank_seed(args.seed))
    agent = build_agent(args, device)
    run = open_run(args)  # the run folder; with --resume, the checkpoint the run goes on from
    try:  # a signal (Ctrl-C, SIGTERM) stops the run at the end of a step, with a checkpoint
        if run.phase == "sft" and args.sft_steps:  # the paper starts RL from an SFT model
            sft(agent, args, run)
        if args.eval_start_episodes and "start" not in run.results:
            run.results["start"] = evaluate(agent, args, args.eval_start_episodes)
            log_eval("before RL", run.results["start"])
        optimizer = rl_optimizer(agent, args)
        agent.ref = make_reference(agent.model) if args.kl_coef and args.num_updates else None  # for --kl-coef
        pool = envs.EnvPool(args.task, [envs.episode_seed("rollout", RANK * args.num_envs + i, args.seed)
                                   for i in range(args.num_envs)])  # each process its own envs
        gen_config, rng = generation_config(agent.model, agent.processor, args), random.Random(rank_seed(args.seed))
        start, pool = restore(agent, run, "rl", optimizer, rng, pool)  # --resume: the update to go on from
        for update in progress(range(start + 1, args.num_updates + 1), "ppo", start, args.num_updates):
            lr = args.lr * 0.5 * (1 + math.cos(math.pi * (update - 1) / args.num_updates))  # cosine to 0
            for group in optimizer.param_groups:
                group["lr"] = lr
            (timer, seconds), t_update = make_timer(), time.time()
            rollout = collect_rollout(agent, pool, gen_config, args, rng, timer)
            sps = WORLD * len(rollout.samples) / (time.time() - t_update)
            advantages, returns = compute_gae(rollout.rewards, rollout.values, rollout.terminated, rollout.truncated,
                                              rollout.final_values, rollout.last_values, args.gamma, args.gae_lambda)
            with timer("update"):
                stats = ppo_update(agent, optimizer, rollout, advantages, returns, args, rng)
            run.env_steps += WORLD * len(rollout.samples)
            rollout.finished, rollout.invalid = gather(rollout.finished), gather(rollout.invalid)  # all processes'
            run.recent.extend(rollout.finished)
            log_update(args, run, update, rollout, {**stats, "lr": lr, "sps": sps, "seconds": seconds})
            checkpoint(agent, args, run, "rl", update, optimizer, rng, pool)  # --save-every, the last, a stop
        if args.eval_episodes and args.num_updates and "final" not in run.results:
            run.results["final"] = evaluate(agent, args, args.eval_episodes)
    except (Interrupted, Stopped) as stop:  # Stopped: another process of the job left
        run.results["interrupted"] = {"at": str(stop), "phase": run.phase, "step": run.step, "signals": STOP}
    finish(agent, args, run)
    if WORLD > 1 and "interrupted" not in run.results:
        dist.destroy_process_group()
    return 128 + signal.Signals[STOP[0]] if STOP else 130 if "interrupted" in run.results else 0


PHASES = ["prompt", "generate", "score", "env", "update"]  # where an update's time goes
METRICS = ["update", "env_steps", "success", "return", "episodes", "invalid", "policy_loss", "value_loss",
           "approx_kl", "clip_frac", "ref_kl", "lr", "sps"] + [f"t_{k}" for k in PHASES]


def log_update(args, run, update, rollout, stats):
    """One line per update on the console, one row in metrics.csv (the same numbers), and to --track's
    TensorBoard. stats: the update's losses and KLs, lr, sps and the seconds of each phase."""
    seconds = stats["seconds"]
    done = rollout.finished
    success = float(np.mean([x > 0 for x in done])) if done else float("nan")  # of the episodes that ended
    row = {"update": update, "env_steps": run.env_steps, "success": success, "episodes": len(done),
           "return": float(np.mean(done)) if done else float("nan"), "invalid": float(np.mean(rollout.invalid)),
           **stats, **{f"t_{k}": seconds[k] for k in PHASES}}
    write_row(run, "metrics.csv", METRICS, row, update == 1)
    track({f"rl/{k}": row[k] for k in METRICS[2:]}, run.env_steps)
    split = " ".join(f"{k} {100 * seconds[k] / sum(seconds[p] for p in PHASES):.0f}%" for k in PHASES)
    log(f"update {update}/{args.num_updates} | steps {run.env_steps} | success {row['success']:.2f} ({len(done)} ep) | "
        f"return {row['return']:.2f} | invalid {row['invalid']:.2f} | pg {stats['policy_loss']:.4f} "
        f"v {stats['value_loss']:.4f} kl {stats['approx_kl']:.4f} ref_kl {stats['ref_kl']:.4f} "
        f"clip {stats['clip_frac']:.2f} | lr {stats['lr']:.1e} | {stats['sps']:.1f} sps | {split} | {eta(update)}")
    log(f"  answer: {rollout.example}")


def log_eval(when, result):
    log(f"eval {when}: success {result['success']:.3f} | return {result['return']:.3f} | "
        f"invalid {result['invalid']:.3f} | {result['episodes']} episodes")
    track({f"eval/{k}": result[k] for k in ("success", "return", "invalid")}, 0 if "before" in when else 1)


def check_reading(agent, args, run):
    """After SFT, the reading probe (read_probe). A field read in half the probe states or more, but misread
    in more than one, gets more SFT at the last learning rate, a tenth of --sft-steps at a time, up to half
    as many again: the vision encoder stays frozen in RL, which cannot teach reading. (A field read in
    fewer than half never learned to read: more of the same SFT does not teach it, docs/LOG.md.) One line
    names each field not read everywhere. -> the SFT steps beyond --sft-steps so far."""
    extra = run.results.get("sft_extra", 0)
    if args.no_cot:  # without thoughts there are no state fields to read
        return extra
    run.results["reading"] = shares = read_probe(agent, args, PROBE_STATES)[0]
    missed = [f'"{f}" in {100 * s:.0f}%' for f, s in shares.items() if s < 1]
    more = max(args.sft_steps // 10, 1)
    if any(s >= 0.5 and round((1 - s) * PROBE_STATES) > 1 for s in shares.values()) and extra < args.sft_steps // 2:
        run.results["sft_extra"] = extra = extra + more
        log(f"SFT reads {', '.join(missed)} of the probe states: {more} more SFT steps")
    else:
        log(f"SFT reads {', '.join(missed)} of the probe states; more --sft-steps may help" if missed else
            f"SFT reads every field ({', '.join(shares)}) in all the probe states")
    track({f"reading/{f}": s for f, s in shares.items()}, args.sft_steps + extra)
    return extra


def finish(agent, args, run):
    """results.json (the model is already saved: checkpoint()) and the summary lines."""
    results = run.results
    if run.recent:  # the official code's metric: the last training episodes
        results["recent_training"] = {"success": float(np.mean([x > 0 for x in run.recent])),
                                      "episodes": len(run.recent)}
    if agent.device.type == "cuda":  # what --micro-batch-size, --num-envs, ... left of the GPU
        results["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(agent.device) / 2**30
        log(f"peak GPU memory {results['peak_gpu_memory_gib']:.1f} GiB")
    results["total_seconds"] = time.time() - T_START  # this process's (a resumed run: since the resume)
    write_results(args, run, finished="interrupted" not in results)
    if "final" in results:
        log_eval("after RL", results["final"])
    if "start" in results and "final" in results:
        start, final = results["start"], results["final"]
        on = "" if start["episodes"] == final["episodes"] else f" (on {start['episodes']})"
        log(f"success on {final['episodes']} evaluation episodes: SFT start {start['success']:.3f}{on} -> "
            f"after RL {final['success']:.3f} (invalid {final['invalid']:.3f}); "
            f"{(time.time() - T_START) / 60:.1f} min in all")
    if run.recent:
        log(f"success of the last {len(run.recent)} training episodes (the official code's metric): "
            f"{results['recent_training']['success']:.3f}")
    if "interrupted" in results:
        log(f"stopped ({results['interrupted']['at']}); the checkpoint in {os.path.join(args.save_dir, 'model')} "
            f"goes on with: python rl4vlm.py --resume {args.save_dir}")


def cli(args):
    """main() with its one-line errors (process 0's alone), and SIGINT and SIGTERM (Ctrl-C; timeout, SLURM,
    Kubernetes, torchrun) stopping the run at a step's end: what the command line runs."""
    def fail(message):
        sys.exit(f"rl4vlm.py: error: {message}" if RANK == 0 else 1)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    try:
        return main(args)
    except (LoadError, UsageError) as e:
        fail(e)
    except KeyboardInterrupt:
        fail("interrupted before training began; nothing was saved")
    except FloatingPointError as e:
        fail(f"{e}; the update was stopped and nothing was saved (try a lower --lr or --sft-lr)")
    except torch.OutOfMemoryError:
        fail(f"out of GPU memory, nothing was saved: lower --micro-batch-size (now {args.micro_batch_size}), "
             f"--num-envs ({args.num_envs}) or --max-new-tokens ({args.max_new_tokens})"
             + ("" if args.gradient_checkpointing else ", or add --gradient-checkpointing"))


# ----------------------------------------------------------------------------------------------
# Appendix: model inputs. Prompts + images -> left-padded batches, cut into one sample per env step and joined
# again for scoring, for every family's image layout.

PROCESSED = weakref.WeakKeyDictionary()  # processor -> {(prompt, image digest): its unpadded row of inputs}
PROCESSED_MAX = 512  # rows kept per processor (then the store starts again)


def chat_texts(processor, prompts):
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}] for p in prompts]
    return [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]


def process(processor, prompts, images, device):
    """Prompts + images -> model inputs, left-padded: (B, P) ids and mask, plus the image tensors. Each pair
    is processed once and its row kept (NumberLine shows 30 pictures); the padding is padding=True's."""
    from PIL import Image
    store = PROCESSED.setdefault(processor, {})
    keys = [(p, hashlib.sha1(im.tobytes()).hexdigest() + str(im.shape)) for p, im in zip(prompts, images)]
    new = {k: im for k, im in zip(keys, images) if k not in store}  # the batch's unseen pairs, once each
    if new:
        if len(store) + len(new) > PROCESSED_MAX:  # full: start again from this batch alone
            store.clear()
            new = dict(zip(keys, images))
        inputs = processor(text=chat_texts(processor, [p for p, _ in new]),
                           images=[[Image.fromarray(im)] for im in new.values()], padding=True, return_tensors="pt")
        inputs.pop("labels", None)  # PaliGemma's processor adds them; the model would compute a loss
        store.update(zip(new, split_rows(inputs, inputs["attention_mask"].bool(), range(len(new)))))
    texts, pictures = zip(*(store[k] for k in keys))
    P = max(len(t["input_ids"]) for t in texts)
    batch = {}
    for name in texts[0]:  # left padding, as the processor's: every prompt ends at column P - 1
        pad = processor.tokenizer.pad_token_id if name == "input_ids" else 0
        batch[name] = torch.full((len(texts), P), pad, dtype=texts[0][name].dtype)
        for i, t in enumerate(texts):
            batch[name][i, P - len(t[name]):] = t[name]
    return {k: v.to(device) for k, v in {**batch, **join_rows(pictures)}.items()}


PATCH_FIELDS = {f["patches"] for f in FAMILIES.values() if "patches" in f}  # image_grid_thw


def split_rows(inputs, real, rows):
    """Batched inputs -> for each row in rows, (its (B, P) text fields cut to `real`, its image fields). Image
    fields keep a leading dimension, so that join_rows() is torch.cat for every family: a row of a
    per-image field, or Qwen's own rows of pixel values (all images' patches), as its grid (B, 3) counts."""
    shape = inputs["input_ids"].shape
    grid = next((inputs[k] for k in PATCH_FIELDS if k in inputs), None)
    ends = None if grid is None else grid.prod(-1).cumsum(0)
    out = []
    for i in rows:
        text, image = {}, {}
        for k, v in inputs.items():
            if v.shape == shape:
                text[k] = v[i][real[i]]
            elif grid is not None and k not in PATCH_FIELDS and len(v) == ends[-1]:  # one row per patch
                image[k] = v[ends[i] - grid[i].prod():ends[i]]
            else:
                image[k] = v[i:i + 1]
        out.append((text, image))
    return out


def join_rows(images):
    """The inverse of split_rows for image fields: one batch of the rows' image tensors."""
    return {k: torch.cat([im[k] for im in images]) for k in images[0]}


def make_sample(inputs, row, response_ids, tokenizer):
    """One step's context, exactly as the model saw it: unpadded prompt ids and the other fields aligned
    with them (Qwen's mm_token_type_ids, Gemma's token_type_ids), image tensors, answer."""
    (text, image), = split_rows(inputs, inputs["attention_mask"].bool(), [row])
    text, image = ({k: v.cpu() for k, v in d.items() if k != "attention_mask"} for d in (text, image))
    return {"prompt_ids": text.pop("input_ids"), "text": text, "image": image,
            "response_ids": response_ids, "action_start": action_start(tokenizer, response_ids)}


def collate(samples, pad_id, device, shape=None):
    """Samples -> one batch: prompts left-padded to P, answers right-padded to R, so every prompt ends at
    column P - 1; (B, R) thought and action masks. shape, (rows, P, R): pad to at least these, rows with
    copies of the last sample, whose scores the caller drops (see rescore)."""
    rows, P, R = shape or (0, 0, 0)
    samples = samples + samples[-1:] * (rows - len(samples))
    P = max(P, max(len(s["prompt_ids"]) for s in samples))
    R = max(R, max(len(s["response_ids"]) for s in samples))
    B = len(samples)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + R), dtype=torch.long)
    thought_mask, action_mask = answer_masks(samples, R)
    for i, s in enumerate(samples):
        p, r = len(s["prompt_ids"]), len(s["response_ids"])
        input_ids[i, P - p:P] = s["prompt_ids"]
        input_ids[i, P:P + r] = s["response_ids"]
        attention_mask[i, P - p:P + r] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "thought_mask": thought_mask, "action_mask": action_mask}
    for k in samples[0]["text"]:  # 0 on padding and over the answer (text, not image)
        batch[k] = torch.zeros((B, P + R), dtype=samples[0]["text"][k].dtype)
        for i, s in enumerate(samples):
            batch[k][i, P - len(s["prompt_ids"]):P] = s["text"][k]
    batch.update(join_rows([s["image"] for s in samples]))
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# Appendix: the agent from the tiny model, a real checkpoint or a saved run; loading any checkpoint, and
# saving that never loses the last good model.

def build_agent(args, device):
    """The VLM: the tiny one, a real checkpoint (--model) or a saved run (--load); LoRA, checkpointing."""
    value_state, base_model = None, where(args.model)
    if args.resume or args.load:  # a run's checkpoint
        model, processor, value_state, loaded = load_checkpoint(os.path.join(args.save_dir, "model")
                                                                if args.resume else args.load, device, args.dtype)
        base_model = loaded.get("base_model")
        if not args.resume and (loaded.get("task") != args.task or loaded.get("cot") == args.no_cot):
            log(f"note: {args.load} was trained on {loaded.get('task')} (cot={loaded.get('cot')})")
        if not args.resume and loaded.get("phase") == "sft" and loaded["step"] < loaded["args"]["sft_steps"]:
            log(f"note: {args.load} stopped in SFT, at step {loaded['step']}: --resume its run to finish it")
    elif args.model == "tiny":
        model, processor = build_tiny(args.tiny_arch, args.tiny_size)
        model.to(device)
    else:
        model, processor = load_vlm(args.model, device, args.dtype)
    compute = model_dtype(model.config, device, args.dtype)
    if args.lora and not hasattr(model, "peft_config"):  # a loaded adapter is already LoRA
        model = add_lora(model.to(compute), args.lora_rank)  # the base in `compute`; peft keeps adapters in fp32
        base_model = where(args.load) if args.load else base_model  # a loaded full checkpoint is the adapter's base
    elif not hasattr(model, "peft_config"):  # full fine-tuning: Adam steps fp32 weights; 16 bits only compute
        model.float()
        model.compute_dtype = compute if compute != torch.float32 else None  # autocast()
    if args.gradient_checkpointing:  # non-reentrant: the only kind that works with LoRA's frozen base
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if not (args.tiny or hasattr(model, "peft_config")) and args.kl_coef and args.num_updates:
        log("note: full fine-tuning holds 18 bytes a parameter (fp32 weights, gradients and Adam's moments, a bf16 "
            "KL reference), 126 GB for a 7B model; --lora holds the base once, in bf16")
    value_head = make_value_head(text_hidden_size(model)).to(device)
    if value_state is not None:
        value_head.load_state_dict(value_state)
    for t in [*model.state_dict().values(), *value_head.state_dict().values()] if WORLD > 1 else []:
        collective(dist.broadcast, t, 0)  # one policy: process 0's initial weights everywhere
    log(f"model: {args.load or args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) "
        f"on {device}; task {args.task}, {'CoT' if not args.no_cot else 'no CoT'}; output in {args.save_dir}")
    return Agent(model, processor, value_head, device, base_model)


def build_tiny(arch="llava", size="mini"):
    """The tiny model (--model tiny, --tiny-arch): random weights from a config of the architecture and a BPE
    trained on the tasks' texts, offline (tools/tiny.py), through the classes a real checkpoint uses."""
    from tools import tiny
    return tiny.build(arch, size)


def image_only(name):
    """The stock processor class `name` without its video processor (it needs torchvision); the stock name
    kept, so that a saved folder has a real checkpoint's layout."""
    stock = getattr(transformers, name)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        stock.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
    return type(name, (stock,), {"__init__": __init__, "__module__": __name__})


class LoadError(Exception):
    """A model folder that is missing, incomplete or corrupt: reported in one line."""


def model_dtype(config, device, dtype="auto"):
    """What the model computes in: --dtype, or auto: bf16 on a GPU for a checkpoint stored in 16 bits (real
    ones are; the paper trains in bf16), fp32 for one stored in fp32 (the tiny models and what this file
    saves of them) and on a CPU."""
    if dtype != "auto":
        return getattr(torch, dtype)
    stored = str(getattr(config, "dtype", None) or "").removeprefix("torch.")
    gpu = torch.device(device).type == "cuda"
    return torch.bfloat16 if gpu and stored in ("float16", "bfloat16") else torch.float32


def computes_in(model):
    """The dtype a model computes in: its weights', or, for full fine-tuning in 16 bits, autocast's."""
    return getattr(model, "compute_dtype", None) or model.dtype


def autocast(model):
    """bf16 compute over fp32 weights (full fine-tuning in 16 bits: Adam steps the fp32 weights, whose
    small updates bf16 weights would round away); otherwise the weights' own dtype."""
    dtype = getattr(model, "compute_dtype", None)
    return torch.autocast(model.device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def load_vlm(path, device, dtype="auto"):
    if not (os.path.isdir(path) or re.fullmatch(r"[\w.-]+/[\w.-]+", path)):
        raise LoadError(f"model folder not found: {path}")
    offline = not os.path.isdir(path) and not hub_reachable()  # then only the local cache, at once
    if offline and not huggingface_hub.try_to_load_from_cache(path, "config.json"):
        raise LoadError(f"{path} is not in the local cache and {huggingface_hub.constants.ENDPOINT} cannot be reached")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=offline)
        processor = load_processor(path, config.model_type, offline)  # fails before the weights load
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=model_dtype(config, device, dtype),
                                                            local_files_only=offline).to(device)
    except Exception as e:  # OSError, safetensors and config errors all mean "cannot use this folder"
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LoadError(f"cannot load a model from {path}: {first_line}") from None
    # generate() fills what our config leaves unset from the checkpoint's own (Qwen's repetition_penalty
    # 1.05), and PPO scores softmax(logits / T): keep only its end tokens
    model.generation_config = GenerationConfig(eos_token_id=end_tokens(model, processor.tokenizer),
                                               pad_token_id=processor.tokenizer.pad_token_id)
    return model, processor


def load_processor(path, model_type, offline=False):
    """The family's processor, image-only where the stock one needs a video processor (torchvision)."""
    fam = FAMILIES.get(model_type, {})
    if "refused" in fam:
        raise LoadError(f"not supported: {fam['refused']}")
    processor = (image_only(fam["processor"]) if fam.get("image_only") else AutoProcessor).from_pretrained(
        path, local_files_only=offline)
    if not hasattr(processor, "image_processor"):  # AutoProcessor gives a bare tokenizer, silently, then
        raise LoadError(f"no image processor that AutoProcessor can load (it gave a {type(processor).__name__}); "
                        f"model_type {model_type!r} may need an entry in FAMILIES")
    processor.tokenizer.padding_side = "left"
    return processor


def hub_reachable(timeout=3.0):
    """Whether the model hub answers at all: without a network, transformers retries for half a minute."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def where(model):
    """A model folder as an absolute path (rl4vlm.json's base_model must load from any directory); a hub
    id or "tiny" as it is."""
    return os.path.abspath(model) if os.path.isdir(model) else model


def make_timer():
    """-> (timer, seconds): `with timer("generate"): ...` adds the block's time to seconds["generate"]."""
    seconds = collections.defaultdict(float)
    @contextlib.contextmanager
    def timer(phase):
        t0 = time.time()
        yield
        seconds[phase] += time.time() - t0
    return timer, seconds


def save(model, processor, value_head, path, meta, state=None):
    """Write to a temporary folder, then swap it in: an interrupted save never destroys the last good
    model. meta: {"task", "cot", "base_model", ...}; whether it is a LoRA adapter is read off the model.
    state: what --resume needs beside the weights (checkpoint()), in state.pt."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    lora = hasattr(model, "peft_config")
    # a peft model saves its trained adapter only (not the KL reference's), loaded on top of base_model
    model.save_pretrained(tmp, **({"selected_adapters": ["default"]} if lora else {}))
    processor.save_pretrained(tmp)
    torch.save(value_head.state_dict(), os.path.join(tmp, "value_head.pt"))
    with open(os.path.join(tmp, "rl4vlm.json"), "w") as f:
        json.dump({**meta, "lora": lora}, f, indent=1)
    if state is not None:
        torch.save(state, os.path.join(tmp, "state.pt"))
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path, device, dtype="auto"):
    """A folder written by save(), or the run folder that holds it as model/: -> model, processor,
    value-head state dict, metadata."""
    path = model_folder(path)
    meta_file = os.path.join(path, "rl4vlm.json")
    if not os.path.isdir(path):
        raise LoadError(f"--load folder not found: {path}")
    if not os.path.exists(meta_file):
        raise LoadError(f"{path} was not written by rl4vlm.py (no rl4vlm.json)")
    try:
        with open(meta_file) as f:
            meta = json.load(f)
        value_state = torch.load(os.path.join(path, "value_head.pt"), map_location="cpu", weights_only=True)
    except Exception as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise LoadError(f"corrupt checkpoint in {path}: {type(e).__name__}: {first_line}") from None
    if meta.get("lora") or os.path.exists(os.path.join(path, "adapter_config.json")):  # a LoRA adapter
        model, _ = load_vlm(meta["base_model"], device, dtype)
        import peft
        model = peft.PeftModel.from_pretrained(model, path, is_trainable=True)
        processor = load_processor(path, model.config.model_type)
    else:
        model, processor = load_vlm(path, device, dtype)
    return model, processor, value_state, meta


# ----------------------------------------------------------------------------------------------
# Appendix: a run that stops and goes on. A signal stops it at the end of an SFT step or PPO update,
# where everything is in step; a checkpoint is the model folder save() writes, with state.pt beside
# the weights: the optimiser, the RNGs, the environments, the KL reference, where the run stands.

STOP = []  # the signals received (a run stops at the next step's end)
T_START, CLOCK = time.time(), {}  # CLOCK: the current loop's start, for eta()
TRACKER = None  # --track: TensorBoard's SummaryWriter


class Interrupted(Exception):
    """A signal stopped the run at the end of an SFT step or PPO update, where a checkpoint was saved."""


class UsageError(Exception):
    """A flag that names what this machine does not have (a device): reported in one line."""


def on_signal(signum, frame):
    """SIGINT (Ctrl-C) and SIGTERM (timeout, SLURM, Kubernetes, torchrun) alike: stop at the step's end."""
    if not STOP:
        log(f"{signal.Signals(signum).name}: stopping at the end of this step, with a checkpoint")
    STOP.append(signal.Signals(signum).name)


@dataclasses.dataclass
class Run:
    """Where a run stands: what results.json and a checkpoint record beside the weights."""
    folder: str
    recent: collections.deque  # returns of the last training episodes (the official code's metric)
    phase: str = "sft"         # "sft", then "rl"
    step: int = 0              # SFT steps, then PPO updates, done
    env_steps: int = 0
    results: dict = dataclasses.field(default_factory=dict)
    state: dict = None         # --resume: the checkpoint's state.pt


def open_run(args):
    """The run's folder, new (--overwrite: emptied of a run), or --resume's with its checkpoint's state and
    its metrics cut back to the checkpoint's step."""
    global TRACKER
    run = Run(args.save_dir, collections.deque(maxlen=args.eval_episodes or 200))
    if args.resume:
        run.state = torch.load(os.path.join(args.save_dir, "model", "state.pt"), weights_only=False)  # our own file
        if run.state["world"] != WORLD:
            raise UsageError(f"{args.save_dir} ran as {run.state['world']} processes: resume it as as many")
        run.phase, run.step, run.env_steps, run.results = (run.state[k] for k in ("phase", "step", "env_steps",
                                                                                   "results"))
        run.recent.extend(run.state["recent"])
    if RANK == 0:
        for name in RUN_FILES if args.overwrite else []:
            path = os.path.join(args.save_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path) if os.path.exists(path) else None
        os.makedirs(args.save_dir, exist_ok=True)
        if args.resume:  # what was logged after the checkpoint is logged again
            keep_rows(os.path.join(args.save_dir, "metrics.csv"), "update", run.step if run.phase == "rl" else 0)
            keep_rows(os.path.join(args.save_dir, "sft.csv"), "step", run.step if run.phase == "sft" else math.inf)
        if args.track:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError("--track needs TensorBoard: pip install tensorboard") from None
            TRACKER = SummaryWriter(args.save_dir)  # tensorboard --logdir runs
            TRACKER.add_text("flags", "\n".join(f"    --{k.replace('_', '-')} {v}" for k, v in vars(args).items()))
    return run


def restore(agent, run, phase, optimizer, rng, pool):
    """--resume: the loop of `phase` goes on where its checkpoint left it: the optimiser's moments, the
    RNGs, the environments, the KL reference. -> (steps done, the env pool); else (0, pool)."""
    if run.state is None or run.state["phase"] != phase:
        return 0, pool
    mine = run.state["ranks"][RANK]
    optimizer.load_state_dict(run.state["optimizer"])
    rng.setstate(mine["rng"])
    random.setstate(mine["random"])
    np.random.set_state(mine["numpy"])
    torch.set_rng_state(mine["torch"])
    if agent.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], agent.device)
    if phase == "rl" and agent.ref is not None:
        reference_state(agent, run.state["ref"])
    return run.state["step"], mine["pool"]


def checkpoint(agent, args, run, phase, step, optimizer, rng, pool):
    """At the end of an SFT step or PPO update: a resumable checkpoint at a phase's last step, every
    --save-every updates, and when a signal asks the run to stop, which it then does (Interrupted)."""
    stop = all_mean([float(bool(STOP))], agent.device)[0] > 0  # every process stops at the same step
    run.phase, run.step = phase, step
    last = step == (args.sft_steps + run.results.get("sft_extra", 0) if phase == "sft" else args.num_updates)
    if stop or last or (phase == "rl" and args.save_every and step % args.save_every == 0):
        cuda = torch.cuda.get_rng_state(agent.device) if agent.device.type == "cuda" else None
        ranks = gather([{"rng": rng.getstate(), "pool": pool, "random": random.getstate(), "cuda": cuda,
                         "numpy": np.random.get_state(), "torch": torch.get_rng_state()}])
        state = {"phase": phase, "step": step, "env_steps": run.env_steps, "recent": list(run.recent),
                 "results": run.results, "world": WORLD, "optimizer": optimizer.state_dict(), "ranks": ranks,
                 "ref": reference_state(agent) if phase == "rl" and agent.ref is not None else None}
        if RANK == 0:
            save(agent.model, agent.processor, agent.value_head, os.path.join(args.save_dir, "model"),
                 {"task": args.task, "cot": not args.no_cot, "base_model": agent.base_model, "tiny": args.tiny,
                  "env_steps": run.env_steps, "phase": phase, "step": step, "args": vars(args)}, state)
            write_results(args, run)
        all_mean([0.0], agent.device)  # no process leaves (and has torchrun stop the others) before it is saved
    if stop:
        raise Interrupted(f"{'SFT step' if phase == 'sft' else 'update'} {step}")


def reference_state(agent, state=None):
    """The KL reference's weights (LoRA: its adapter's), or, given them, loads them into it."""
    if agent.ref is not agent.model:
        return agent.ref.state_dict() if state is None else agent.ref.load_state_dict(state)
    import peft
    if state is None:
        return peft.get_peft_model_state_dict(agent.model, adapter_name="reference")
    peft.set_peft_model_state_dict(agent.model, state, adapter_name="reference")


def write_results(args, run, finished=False):
    if RANK == 0:
        with open(os.path.join(args.save_dir, "results.json"), "w") as f:
            json.dump({"args": vars(args), **run.results, "finished": finished}, f, indent=1)


def write_row(run, name, columns, row, first):
    """A row of a CSV file in the run's folder (the header first)."""
    if RANK == 0:
        with open(os.path.join(run.folder, name), "w" if first else "a") as f:
            f.write(",".join(columns) + "\n" if first else "")
            f.write(",".join(f"{row[k]:.6g}" if isinstance(row[k], float) else str(row[k]) for k in columns) + "\n")


def keep_rows(path, column, last):
    """Keep the rows of a CSV whose `column` is at most `last`."""
    if os.path.exists(path):
        with open(path) as f:
            header, *rows = f.read().splitlines()
        i = header.split(",").index(column)
        with open(path, "w") as f:
            f.write("\n".join([header] + [r for r in rows if int(r.split(",")[i]) <= last]) + "\n")


def track(scalars, step):
    for name, value in scalars.items() if TRACKER else ():
        TRACKER.add_scalar(name, value, step)


def progress(steps, desc, done, total):
    """A loop's steps with a progress bar on a terminal; eta() says the same in the log lines."""
    CLOCK.update(t0=time.time(), done=done, total=total)
    return tqdm(steps, desc=desc, initial=done, total=total, disable=RANK > 0 or not sys.stderr.isatty())


def eta(step):
    """The current loop's time so far and to go, at `step` steps done: "0:01:20 in, 0:05:02 to go"."""
    spent = time.time() - CLOCK["t0"]
    left = spent / max(step - CLOCK["done"], 1) * (CLOCK["total"] - step)
    hms = [f"{int(s // 3600)}:{int(s % 3600 // 60):02d}:{int(s % 60):02d}" for s in (spent, left)]
    return f"{hms[0]} in, {hms[1]} to go"


# ----------------------------------------------------------------------------------------------
# Appendix: many processes (torchrun): each runs its own environments and generate, with its own seeds; one
# policy, because every optimiser step sums the gradients of all processes (sum_gradients) and the
# decisions that end an update are taken on all-reduced numbers. A single process takes none of it.

class Stopped(Exception):
    """Another process of the job stopped (Ctrl-C, or an error): this one stops too, cleanly."""


def init_distributed(args):
    """-> this process's device. Under torchrun (RANK, WORLD_SIZE and LOCAL_RANK in the environment),
    joins the job: NCCL between GPUs, gloo between CPU processes."""
    global RANK, WORLD
    RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        asked = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UsageError(f"--device {args.device}: not a device (cpu, cuda, cuda:N)") from None
    if asked.type == "cuda" and (asked.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA devices")
    if WORLD == 1:
        return asked
    gpu = asked.type == "cuda"
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if gpu else "gloo", device_id=device if gpu else None)
    return device


def rank_seed(seed):
    """Process 0 keeps a single process's seeds (its run is the same); each other process gets its own."""
    return seed + 1_000_003 * RANK


def collective(op, *args):
    """A torch.distributed call; a peer that left (its connection closed) stops this process too."""
    try:
        return op(*args)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:
        raise Stopped(str(e).splitlines()[0]) from None


def gather(items):
    """Every process's list, concatenated in rank order (the same list in every process)."""
    if WORLD == 1:
        return list(items)
    lists = [None] * WORLD
    collective(dist.all_gather_object, lists, list(items))
    return [x for part in lists for x in part]


def all_mean(values, device):
    """The mean over processes of each of a few numbers (float64), as a list."""
    if WORLD == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    collective(dist.all_reduce, t)
    return (t / WORLD).tolist()


def sum_gradients(params):
    """The one place where training meets the other processes: each gradient becomes its sum over them,
    one all-reduce per dtype over the flattened gradients. Every loss is scaled so that this sum is the
    gradient of the loss over all processes' samples."""
    if WORLD == 1:
        return
    for p in params:
        if p.grad is None:  # a parameter this process's batch did not reach: its share is 0
            p.grad = torch.zeros_like(p)
    for dtype in sorted({p.grad.dtype for p in params}, key=str):
        grads = [p.grad for p in params if p.grad.dtype == dtype]
        flat = torch.cat([g.flatten() for g in grads])
        collective(dist.all_reduce, flat)
        for g, new in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(new.view_as(g))


if __name__ == "__main__":
    sys.exit(cli(ARGS))
