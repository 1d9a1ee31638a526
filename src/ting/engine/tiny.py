"""`ting tiny-model DIR`: a Qwen2-Audio checkpoint with random weights, built offline in seconds.

It is the real architecture (transformers' Qwen2AudioForConditionalGeneration) with a real byte-level BPE
tokenizer carrying Qwen2-Audio's special tokens and chat template, a processor config (Whisper features,
128 mel bins), and a generation config like the hub checkpoint's. `from_pretrained(DIR)` and
`AutoProcessor.from_pretrained(DIR)` load it unchanged. Everything is deterministic: the same command
writes the same files.

Presets:
  tiny        2+2 layers of width 64, a ~600-token vocabulary: what tests, CI and offline demos run on.
  real-width  the real widths (hidden 4096, 32 heads, vocab 156032 with the special tokens at their real
              ids, encoder 1280/20 heads) with N layers. No weights are written: serve it with
              `--load-format dummy` (random weights made at load time).
  7b          the full Qwen2-Audio-7B shape (32+32 layers), no weights; for GPU benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    Qwen2Tokenizer,
    WhisperFeatureExtractor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

# The order and (with real ids) the numbers of Qwen2-Audio's special tokens.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
REAL_FIRST_SPECIAL_ID = 151643
REAL_VOCAB_SIZE = 156032

# The Instruct checkpoint's chat template (tokenizer_config.json of Qwen/Qwen2-Audio-7B-Instruct).
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# What the byte-level BPE is trained on: enough English and Chinese for real merges, and Chinese
# characters that stay split across byte tokens (so streaming must hold partial UTF-8 back).
CORPUS = """
You are a helpful assistant. What does the person say? What is the sound in this audio? Transcribe the speech.
Translate the audio into English. The speaker sounds happy. Describe the music and the instruments.
The original content of this audio is: Hello, and welcome to Ting. The quick brown fox jumps over the lazy dog.
A man is speaking in a quiet room. Glass is breaking. A dog is barking in the distance. Thank you for listening.
这段音频说的是什么？欢迎使用阿里云。你好，今天天气很好。请把这段语音转写成文字。说话人听起来很高兴。
音乐里有钢琴和小提琴。一只狗在远处叫。谢谢收听。
"""

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden=64,
        intermediate=128,
        heads=4,
        kv_heads=4,
        layers=2,
        enc_width=64,
        enc_heads=4,
        enc_ffn=128,
        enc_layers=2,
        real_vocab=False,
        init_std=0.4,
        weights=True,
    ),
    "real-width": dict(
        hidden=4096,
        intermediate=11008,
        heads=32,
        kv_heads=32,
        layers=2,
        enc_width=1280,
        enc_heads=20,
        enc_ffn=5120,
        enc_layers=2,
        real_vocab=True,
        init_std=0.02,
        weights=False,
    ),
    "7b": dict(
        hidden=4096,
        intermediate=11008,
        heads=32,
        kv_heads=32,
        layers=32,
        enc_width=1280,
        enc_heads=20,
        enc_ffn=5120,
        enc_layers=32,
        real_vocab=True,
        init_std=0.02,
        weights=False,
    ),
}


def build_tokenizer(real_vocab: bool) -> Qwen2Tokenizer:
    trainer_model = Tokenizer(models.BPE())
    trainer_model.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    trainer_model.train_from_iterator([line for line in CORPUS.splitlines() if line] * 4, trainer)
    state = json.loads(trainer_model.to_str())
    vocab: dict[str, int] = dict(state["model"]["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["model"]["merges"]]
    first_special = len(vocab)
    if real_vocab:  # filler entries no merge can produce, so the special tokens get their real ids
        for i in range(len(vocab), REAL_FIRST_SPECIAL_ID):
            vocab[f"<|filler_{i}|>"] = i
        first_special = REAL_FIRST_SPECIAL_ID
    for offset, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = first_special + offset
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # (the stubs are narrower than what the tokenizer takes)
        unk_token=None,  # type: ignore[arg-type]
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        extra_special_tokens=SPECIAL_TOKENS[1:],
    )


def build_config(preset: str, tokenizer: Qwen2Tokenizer, layers: int | None = None) -> Qwen2AudioConfig:
    p = PRESETS[preset]
    ids: dict[str, Any] = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = REAL_VOCAB_SIZE if p["real_vocab"] else len(tokenizer)
    config = Qwen2AudioConfig(
        audio_config=dict(
            model_type="qwen2_audio_encoder",
            num_mel_bins=128,
            d_model=p["enc_width"],
            encoder_layers=layers or p["enc_layers"],
            encoder_attention_heads=p["enc_heads"],
            encoder_ffn_dim=p["enc_ffn"],
            max_source_positions=1500,
            initializer_range=p["init_std"],
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=vocab_size,
            hidden_size=p["hidden"],
            intermediate_size=p["intermediate"],
            num_hidden_layers=layers or p["layers"],
            num_attention_heads=p["heads"],
            num_key_value_heads=p["kv_heads"],
            max_position_embeddings=8192,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            use_sliding_window=False,
            tie_word_embeddings=False,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            initializer_range=p["init_std"],
        ),
        audio_token_index=ids["<|AUDIO|>"],
    )
    config.initializer_range = p["init_std"]
    return config


def generation_config(tokenizer: Qwen2Tokenizer) -> GenerationConfig:
    """Like the hub checkpoint's generation_config.json."""
    eos = [tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return GenerationConfig(
        do_sample=True,
        top_k=20,
        top_p=0.5,
        temperature=0.7,
        repetition_penalty=1.1,
        eos_token_id=eos,
        pad_token_id=eos[0],
        chat_format="chatml",
    )


def build_processor(tokenizer: Qwen2Tokenizer) -> Qwen2AudioProcessor:
    features = WhisperFeatureExtractor(
        feature_size=128,
        sampling_rate=16000,
        hop_length=160,
        n_fft=400,
        chunk_length=30,
        padding_value=0.0,
        return_attention_mask=True,
    )
    return Qwen2AudioProcessor(feature_extractor=features, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build(directory: str | Path, preset: str = "tiny", *, layers: int | None = None, seed: int = 0) -> Path:
    """Write a checkpoint to `directory` (created if missing) and return its path."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(PRESETS[preset]["real_vocab"])
    config = build_config(preset, tokenizer, layers)
    build_processor(tokenizer).save_pretrained(out)
    gen = generation_config(tokenizer)
    if PRESETS[preset]["weights"]:
        torch.manual_seed(seed)
        model = Qwen2AudioForConditionalGeneration(config)
        model.generation_config = gen
        model.save_pretrained(out)
    else:
        config.save_pretrained(out)
        gen.save_pretrained(out)
    return out
