"""`ting tiny-model`: built offline, deterministic, and loaded by plain transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from ting.engine import tiny


def test_the_checkpoint_has_every_file_and_rebuilds_byte_for_byte(tiny_dir: Path, tmp_path: Path) -> None:
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert names == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    again = tiny.build(tmp_path / "again")
    for name in names:
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_plain_transformers_loads_and_runs_it(tiny_dir: Path) -> None:
    model = Qwen2AudioForConditionalGeneration.from_pretrained(tiny_dir)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    tok = processor.tokenizer
    assert type(processor).__name__ == "Qwen2AudioProcessor" and type(tok).__name__ == "Qwen2Tokenizer"
    ids = tok.convert_tokens_to_ids(tiny.SPECIAL_TOKENS)
    assert ids == list(range(ids[0], ids[0] + 6))  # in the real order, at the end of the vocabulary
    assert model.config.audio_token_id == tok.convert_tokens_to_ids("<|AUDIO|>")
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ids[0], ids[2]] and generation["top_k"] == 20
    messages = [{"role": "user", "content": [{"type": "audio", "audio_url": "x"}, {"type": "text", "text": "Hi"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    audio = np.sin(np.arange(48000) / 20).astype(np.float32) * 0.3
    inputs = processor(text=text, audio=audio, sampling_rate=16000, return_tensors="pt")
    assert int((inputs.input_ids == model.config.audio_token_id).sum()) == 75
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > inputs.input_ids.shape[1]


def test_byte_level_bpe_splits_chinese_characters(tiny_dir: Path) -> None:
    tok = AutoProcessor.from_pretrained(tiny_dir).tokenizer
    ids = tok("钢琴曲很好听", add_special_tokens=False).input_ids
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)  # some tokens carry partial UTF-8 characters
    assert tok.decode(ids) == "钢琴曲很好听"


def test_the_real_width_preset_writes_no_weights_and_real_ids(tmp_path: Path) -> None:
    out = tiny.build(tmp_path / "rw", "real-width", layers=1)
    assert not list(out.glob("*.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 4096 and config["text_config"]["vocab_size"] == 156032
    assert config["audio_token_index"] == 151646
    tok = AutoProcessor.from_pretrained(out).tokenizer
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|audio_eos|>"]) == [151643, 151645, 151648]


def test_the_cli_builds_it(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "ting", "tiny-model", str(tmp_path / "cli")], check=True, capture_output=True)
    assert (tmp_path / "cli" / "model.safetensors").exists()
