"""The README's real-model command on random-weight models of the paper's and the follow-ups' 7B VLMs.

    python tools/gpu_check.py                  # on a GPU: both 7B models, 2 x 15 GB written to --out
    python tools/gpu_check.py --shrink         # the same folders with small layers, on a CPU (a test runs this)

For llava-hf/llava-v1.6-mistral-7b-hf and Qwen/Qwen2.5-VL-7B-Instruct it writes a folder in the hub
checkpoint's layout: config.json with the checkpoint's own values (HUB below), random bf16 weights,
a byte-level BPE trained on the task texts and filled with unused tokens to the real vocabulary,
with the real special tokens at their real ids, the real image processor settings, chat template
and generation_config.json (Qwen's repetition_penalty 1.05 included). Then it runs
`rl4vlm.py --model FOLDER --lora --gradient-checkpointing` for a few SFT steps and 2 PPO updates
and prints peak GPU memory and the seconds of an SFT step, a rollout and an update. Qwen2.5-VL-3B's
shape is fully fine-tuned instead (no --lora): fp32 weights that Adam steps, bf16 compute. A random model's
answers run to --max-new-tokens (256 by default at real scale): the worst case for memory.
--shrink keeps every shape that is not a layer's width or depth (vocabulary, image size, tiles,
token ids), so the same code paths run on a CPU in a few minutes.
"""
import argparse
import copy
import csv
import json
import os
import resource
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

# The hub files' values, as published with each checkpoint (config.json, preprocessor_config.json,
# processor_config.json, generation_config.json, the tokenizer's special tokens and chat template).
# Mistral's text config leaves hidden_size, layers and heads to MistralConfig's defaults (4096, 32, 32).
HUB = {
    "llava-next": dict(
        name="llava-hf/llava-v1.6-mistral-7b-hf",
        config={"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
                "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                "image_token_index": 32000, "projector_hidden_act": "gelu", "torch_dtype": "float16",
                "use_image_newline_parameter": True, "vision_feature_layer": -2,
                "vision_feature_select_strategy": "default", "vocab_size": 32064,
                "text_config": {"model_type": "mistral", "intermediate_size": 14336, "max_position_embeddings": 32768,
                                "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
                                "sliding_window": None, "vocab_size": 32064},
                "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336,
                                  "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                                  "patch_size": 14, "projection_dim": 768}},
        preprocessor={"image_processor_type": "LlavaNextImageProcessor", "processor_class": "LlavaNextProcessor",
                      "aspect_ratio_setting": "anyres", "crop_size": {"height": 336, "width": 336},
                      "size": {"shortest_edge": 336}, "do_pad": True, "resample": 3,
                      "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                      "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
        processor={"processor_class": "LlavaNextProcessor", "patch_size": 14, "vision_feature_select_strategy": "default",
                   "num_additional_image_tokens": 1, "image_token": "<image>"},
        generation={"bos_token_id": 1, "eos_token_id": 2},
        # (base vocabulary, special tokens first, special tokens after the base vocabulary)
        vocab=(32000, ["<unk>", "<s>", "</s>"], ["<image>", "<pad>"]),
        tokenizer=dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                       extra_special_tokens={"image_token": "<image>"}),
        chat_template="{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% for c in m['content'] %}"
                      "{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}{% for c in m['content'] %}"
                      "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} [/INST]{% else %} "
                      "{{ m['content'][0]['text'] }}</s> {% endif %}{% endfor %}"),
    "qwen2.5-vl": dict(
        name="Qwen/Qwen2.5-VL-7B-Instruct",
        config={"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
                "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
                "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
                "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584, "intermediate_size": 18944,
                "max_position_embeddings": 128000, "max_window_layers": 28, "num_attention_heads": 28,
                "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
                "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": False,
                "torch_dtype": "bfloat16", "vocab_size": 152064,
                "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
                "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                                  "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                                  "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                                  "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                                  "temporal_patch_size": 2}},
        preprocessor={"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
                      "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                      "merge_size": 2, "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
        processor=None,
        generation={"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643],
                    "do_sample": True, "repetition_penalty": 1.05, "top_k": 1, "top_p": 0.001, "temperature": 0.1},
        vocab=(151643, [], ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                            "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]),
        tokenizer=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        chat_template="{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
                      "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
                      "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|>"
                      "<|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}
# Qwen2.5-VL-3B-Instruct: the 7B's layout at its own widths, fully fine-tuned in 16 bits (no --lora)
HUB["qwen2.5-vl-3b"] = dict(HUB["qwen2.5-vl"], name="Qwen/Qwen2.5-VL-3B-Instruct", full=True, config=dict(
    HUB["qwen2.5-vl"]["config"], hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
    num_key_value_heads=2, max_window_layers=70, vocab_size=151936, tie_word_embeddings=True,
    vision_config=dict(HUB["qwen2.5-vl"]["config"]["vision_config"], out_hidden_size=2048)))
SHRINK = {  # --shrink: layers' widths and depths only
    "llava-next": {"text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "num_key_value_heads": 2},
                   "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                     "num_attention_heads": 2, "projection_dim": 32}},
    "qwen2.5-vl": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "max_window_layers": 2, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
                   "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                     "out_hidden_size": 64, "fullatt_block_indexes": [1]}},
}
SHRINK["qwen2.5-vl-3b"] = SHRINK["qwen2.5-vl"]


def merged(base, over):
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "rope_scaling" else v
    return out


def tokenizer(spec):
    """A byte-level BPE trained on the tasks' prompts and answers, its vocabulary filled with unused tokens
    to the checkpoint's base size, then the checkpoint's special tokens at their ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from tools import tiny
    size, first, after = spec["vocab"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(tiny.tokenizer_corpus(16), trainers.BpeTrainer(
        vocab_size=2000, special_tokens=first, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(bpe.to_str())
    vocab = model["model"]["vocab"]
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), size)})
    model["added_tokens"] += [{"id": size + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                               "normalized": False, "special": True} for i, t in enumerate(after)]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(model)), padding_side="left",
                                   **spec["tokenizer"])


def write_checkpoint(name, folder, shrink, device):
    """A folder in the hub checkpoint's layout, with random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    spec = HUB[name]
    os.makedirs(folder, exist_ok=True)
    tok = tokenizer(spec)
    tok.save_pretrained(folder)
    config = merged(spec["config"], SHRINK[name]) if shrink else spec["config"]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    model.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    files = {"preprocessor_config.json": spec["preprocessor"], "processor_config.json": spec["processor"],
             "generation_config.json": spec["generation"], "chat_template.json": {"chat_template": spec["chat_template"]}}
    for file, content in files.items():
        if content is not None:
            with open(os.path.join(folder, file), "w") as f:
                json.dump(content, f, indent=1)
    return params


def run(folder, out, flags):
    """rl4vlm.py on the folder -> (seconds per SFT step, per rollout, per update, peak GPU GiB, first approx KL)."""
    cmd = [sys.executable, os.path.join(HERE, "rl4vlm.py"), "--model", folder, "--gradient-checkpointing",
           "--eval-episodes", "0", "--save-dir", out, "--overwrite", *flags]
    print("$", " ".join(cmd[1:]), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"gpu_check.py: rl4vlm.py failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(out, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    rollout = [sum(float(r[f"t_{k}"]) for k in ("prompt", "generate", "score", "env")) for r in rows]
    sft_steps = results["args"]["sft_steps"]
    return (results["sft_seconds"] / max(sft_steps, 1), sum(rollout) / len(rollout),
            sum(float(r["t_update"]) for r in rows) / len(rows), results.get("peak_gpu_memory_gib"), float(rows[0]["approx_kl"]))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu-check", help="where the checkpoint folders and runs go")
    p.add_argument("--models", nargs="+", default=list(HUB), choices=list(HUB))
    p.add_argument("--shrink", action="store_true", help="small layers, on a CPU")
    p.add_argument("--sft-steps", type=int, default=2)
    p.add_argument("--num-steps", type=int, default=4, help="rollout steps per env (x --num-envs, 4 at real scale)")
    p.add_argument("--flags", default="", help="more rl4vlm.py flags, e.g. '--micro-batch-size 2'")
    a = p.parse_args()
    import torch
    device = "cpu" if a.shrink else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check.py: error: no GPU here; --shrink runs the same check with small layers on a CPU")
    flags = ["--sft-steps", str(a.sft_steps), "--num-updates", "2", "--num-steps", str(a.num_steps), "--device", device]
    flags += ["--sft-batch-size", "4", "--max-new-tokens", "24", "--num-envs", "2"] if a.shrink else []
    rows = []
    for name in a.models:
        folder, out = os.path.join(a.out, name), os.path.join(a.out, f"run-{name}")
        params = write_checkpoint(name, folder, a.shrink, device)
        # full fine-tuning computes in bf16 over fp32 weights; on a CPU that takes --dtype bfloat16
        how = (["--dtype", "bfloat16"] if a.shrink else []) if HUB[name].get("full") else ["--lora"]
        rows.append((name, params, *run(folder, out, flags + how + a.flags.split())))
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none (--shrink, CPU)"
    host = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"\nGPU: {gpu}; torch {torch.__version__}; peak host memory of a run {host:.1f} GB")
    print("| model (random weights, real shapes) | parameters | training | peak GPU memory | s / SFT step | s / rollout "
          "| s / update | approx KL, first update |")
    print("|---|---|---|---|---|---|---|---|")
    for name, params, sft, rollout, update, peak, kl in rows:
        peak = "-" if peak is None else f"{peak:.1f} GiB"
        size = f"{params / 1e6:.1f}M" if a.shrink else f"{params / 1e9:.2f}B"
        how = "full, fp32 weights, bf16 compute" if HUB[name].get("full") else "LoRA r 128" if not a.shrink else "LoRA"
        print(f"| {HUB[name]['name']}{' (shrunk)' if a.shrink else ''} | {size} | {how} | {peak} | {sft:.2f} | "
              f"{rollout:.1f} | {update:.1f} | {kl:.2g} |")
