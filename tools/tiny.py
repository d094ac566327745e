"""The tiny offline models: what rl4vlm.py's --model tiny (the default) and --tiny-arch build.

    python rl4vlm.py --task numberline              # the tiny LLaVA (0.7M parameters)
    python rl4vlm.py --tiny-arch qwen2.5-vl         # the same method on a tiny Qwen2.5-VL

Random weights built from configs, and a byte-level BPE trained on the tasks' prompts and answers:
nothing is downloaded, and every step of the method runs through the same transformers classes a
real checkpoint does. Each family's recipe keeps its image layout at 112 px (128 for Qwen3-VL), its
special tokens and its processor (image-only where the stock one wants a video processor, which needs
torchvision). What each family needs and why: docs/families.md.
"""
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402
import rl4vlm as R  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedTokenizerFast  # noqa: E402


def build(arch="llava", size="mini"):
    """The tiny model of an architecture of rl4vlm.TINY_ARCHS: -> (model, processor)."""
    return build_tiny_vlm(size) if arch == "llava" else build_tiny_family(arch, size)


CHAT_TEMPLATE = (  # LLaVA-1.5's conversation format: "USER: <image>\n{prompt} ASSISTANT:"
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
TINY_SIZES = {  # (vision width, vision layers, text width, text layers)
    "mini": (64, 2, 128, 2), "small": (128, 2, 256, 4), "base": (192, 2, 384, 4),
}
TINY_IMAGE, TINY_PATCH = 112, 14  # 8x8 patches: every rank and number in envs.py stays legible at 112


def tokenizer_corpus(n_states=64):
    """Prompts and answers of all four tasks (with and without CoT), to train the tiny BPE on, split as
    the model sees them: "USER: ", <image> (a special token), "\n" + prompt + " ASSISTANT:", " " + answer."""
    texts = []
    for task in envs.TASKS:
        env = envs.make(task)
        for s in range(n_states):
            _, info = env.reset(seed=envs.episode_seed("tokenizer", s))
            for _ in range(3):
                a = env.expert_action() if s % 2 else int(env.np_random.integers(len(env.action_names)))
                for cot in (True, False):  # as CHAT_TEMPLATE and sft() write them
                    texts += ["USER: ", f"\n{R.build_prompt(task, env.action_names, info, cot)} ASSISTANT:",
                              " " + R.format_response(task, info, env.action_names[a], cot)]
                _, _, terminated, truncated, info = env.step(a)
                if terminated or truncated:
                    break
    return texts


def build_tiny_vlm(size="mini", vocab_size=1024):
    """A LLaVA-architecture VLM (CLIP-style vision tower + Llama text model) and its processor."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaImageProcessorPil,
                              LlavaProcessor, PreTrainedTokenizerFast)

    # Byte-level BPE: any text tokenizes (no unknown tokens). Merges may cross spaces, so the constant
    # text of prompts and answers becomes a few long tokens (short sequences, fast steps). Every digit is
    # a token of its own (a number is read digit by digit, never fused with its context), and so is ' "'
    # (a JSON string's opening): every action value is chosen at one place, after a shared ' "', rather
    # than BPE fusing quote, value and brace into one token per action ('"-"}') that competes with any
    # other string.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(' "'), behavior="isolated"), pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(tokenizer_corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", extra_special_tokens={"image_token": "<image>"},
                                        padding_side="left")  # left padding: prompts end together
    image_processor = LlavaImageProcessorPil(  # the PIL processor: no torchvision needed
        size={"shortest_edge": TINY_IMAGE}, crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=TINY_PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)  # CLIP's CLS token is dropped: 64 image tokens

    vw, vl, tw, tl = TINY_SIZES[size]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vw, intermediate_size=2 * vw, num_hidden_layers=vl,
                                       num_attention_heads=4, image_size=TINY_IMAGE, patch_size=TINY_PATCH),
        text_config=LlamaConfig(hidden_size=tw, intermediate_size=2 * tw, num_hidden_layers=tl,
                                num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tokenizer),
                                max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(TINY_IMAGE // TINY_PATCH) ** 2,
        vision_feature_layer=-1,  # a two-layer tower has no useful second-to-last layer
        vision_feature_select_strategy="default")
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor


# --tiny-arch's recipes, one per model_type: the tokenizer's extra special tokens, what stands for the
# image in the chat template, the image processor, the processor's arguments, and the config given
# (vision width, vision layers, text config, tokenizer). Each keeps its family's image layout at 112 px.
def _llama(t):  # a Llama text config, for the families whose language model is one
    return {**t, "model_type": "llama"}


def _qwen(t, tok, **extra):  # Qwen's 3-D RoPE splits half of each head's dimensions over (time, h, w)
    half = t["hidden_size"] // t["num_attention_heads"] // 2
    rope = {"rope_type": "default", "mrope_section": [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]}
    return dict(text_config={**t, "rope_parameters": rope, **extra},
                **{k + "_id": tok.convert_tokens_to_ids(v) for k, v in QWEN["tokens"].items()})


CLIP = {"model_type": "clip_vision_model", "num_attention_heads": 4, "image_size": 112, "patch_size": 14}
QWEN = dict(tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_start_token":
                    "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
            image="<|vision_start|><|image_pad|><|vision_end|>", processor={},  # 112 px: 8x8 patches, 16 tokens
            image_processor=("Qwen2VLImageProcessorPil", dict(size={"shortest_edge": 112 * 112, "longest_edge":
                                                                     112 * 112}, patch_size=14, merge_size=2)))
TINY_RECIPES = {
    "llava_next": dict(
        tokens={"image_token": "<image>"}, image="<image>\n",
        image_processor=("LlavaNextImageProcessorPil", dict(size={"shortest_edge": 112}, crop_size={"height": 112,
                                                           "width": 112}, image_grid_pinpoints=[[112, 112]])),
        processor=dict(patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1),
        config=lambda w, n, t, tok: dict(
            vision_config={**CLIP, "hidden_size": w, "intermediate_size": 2 * w, "num_hidden_layers": n},
            text_config=_llama(t), image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=64,
            image_grid_pinpoints=[[112, 112]], vision_feature_layer=-1, vision_feature_select_strategy="default")),
    "qwen2_vl": dict(QWEN, config=lambda w, n, t, tok: dict(
        vision_config=dict(depth=n, embed_dim=w, hidden_size=t["hidden_size"], num_heads=4), **_qwen(t, tok))),
    "qwen2_5_vl": dict(QWEN, config=lambda w, n, t, tok: dict(
        vision_config=dict(depth=n, hidden_size=w, intermediate_size=2 * w, num_heads=4,
                           out_hidden_size=t["hidden_size"], fullatt_block_indexes=[n - 1]), **_qwen(t, tok))),
    "qwen3_vl": dict(QWEN, image_processor=("Qwen2VLImageProcessorPil", dict(  # 128 px: 16 tokens
        size={"shortest_edge": 128 * 128, "longest_edge": 128 * 128}, patch_size=16, merge_size=2)),
        config=lambda w, n, t, tok: dict(
            vision_config=dict(depth=n, hidden_size=w, intermediate_size=2 * w, num_heads=4, patch_size=16,
                               out_hidden_size=t["hidden_size"], num_position_embeddings=64,
                               deepstack_visual_indexes=[0]),
            **_qwen(t, tok, head_dim=t["hidden_size"] // t["num_attention_heads"]))),
    "idefics3": dict(
        tokens={"image_token": "<image>"}, image="<image>",
        image_processor=("Idefics3ImageProcessorPil", dict(size={"longest_edge": 112}, do_image_splitting=False,
                                                          max_image_size={"longest_edge": 112})),
        processor=dict(image_seq_len=16),  # 8x8 patches, pixel-shuffled by scale_factor 2
        config=lambda w, n, t, tok: dict(
            vision_config=dict(hidden_size=w, intermediate_size=2 * w, num_hidden_layers=n, num_attention_heads=4,
                               image_size=112, patch_size=14),
            text_config=_llama(t), image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2)),
    "gemma3": dict(
        tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
        image="<start_of_image>", image_processor=("Gemma3ImageProcessorPil", dict(size={"height": 112, "width": 112})),
        processor=dict(image_seq_length=16),  # 8x8 patches, pooled to 4x4
        config=lambda w, n, t, tok: dict(
            vision_config={**CLIP, "model_type": "siglip_vision_model", "hidden_size": w,
                           "intermediate_size": 2 * w, "num_hidden_layers": n},
            text_config={**t, "model_type": "gemma3_text", "head_dim": t["hidden_size"] // t["num_attention_heads"]},
            mm_tokens_per_image=16, image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
            boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
            eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"))),
}


def build_tiny_family(arch, size="mini"):
    """A tiny random-weight model of another family's real architecture (TINY_RECIPES), with the tiny
    LLaVA's BPE and that family's special tokens, and its processor (image-only if need be)."""
    model_type = R.TINY_ARCHS[arch]
    fam, recipe = R.FAMILIES[model_type], TINY_RECIPES[model_type]
    bpe = build_tiny_vlm(size)[1].tokenizer
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(bpe.backend_tokenizer), pad_token=bpe.pad_token,
                                        bos_token=bpe.bos_token, eos_token=bpe.eos_token, padding_side="left",
                                        extra_special_tokens=recipe["tokens"])
    name, kwargs = recipe["image_processor"]
    processor_class = R.image_only(fam["processor"]) if fam.get("image_only") else getattr(transformers, fam["processor"])
    processor = processor_class(image_processor=getattr(transformers, name)(**kwargs), tokenizer=tokenizer,
                                chat_template=CHAT_TEMPLATE.replace("<image>\n", recipe["image"]),
                                **recipe.get("processor", {}))
    vw, vl, tw, tl = TINY_SIZES[size]
    text = dict(hidden_size=tw, intermediate_size=2 * tw, num_hidden_layers=tl, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=1024,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    config = AutoConfig.for_model(model_type, **recipe["config"](vw, vl, text, tokenizer))
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor

