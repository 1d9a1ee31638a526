"""One prepare (chat template, tokenizer, log-mel features, audio digests): the processor's way against Ting's.

`processor` is what prepare did before qwen2_audio.LogMel: transformers' Qwen2AudioProcessor over the features
span (the code still runs for a checkpoint whose extractor LogMel does not reproduce: _through_processor). `ting`
is prepare as it is. Both run in this process, interleaved call by call (a busy machine slows both alike), with
torch at one thread as in the server process; each case first checks that both give the same prompt. Prints the
median wall and CPU time per prepare.

  python bench/prepare.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import make_request, prepare_model  # bench/engine.py
from ting.engine.backend import Prompt
from ting.engine.prompt import template_messages
from ting.engine.qwen2_audio import Qwen2AudioInputs, limit_threads, load_inputs
from ting.types import Message, TextPart


def through_processor(inputs: Qwen2AudioInputs) -> Callable[[tuple[Message, ...]], Prompt]:
    def prepare(messages: tuple[Message, ...]) -> Prompt:
        shaped, clips = template_messages(messages)
        text = inputs.processor.apply_chat_template(shaped, add_generation_prompt=True, tokenize=False)
        return inputs._through_processor(text, [c.samples for c in clips])

    return prepare


def cases() -> dict[str, tuple[Message, ...]]:
    two = (make_request(0, 2.6)[0].parts[0], make_request(1, 7.0)[0].parts[0], TextPart("Which is louder?"))
    return {
        "2.6 s clip": make_request(0, 2.6),
        "30 s clip": make_request(1, 30.0),
        "2.6 s + 7 s clips": (Message("user", two),),
        "0.5 s clip": make_request(2, 0.5),
        "text only": (Message("user", (TextPart("Hello, how are you today?"),)),),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    limit_threads(1)
    inputs = load_inputs(prepare_model("tiny"))
    ways = {"processor": through_processor(inputs), "ting": inputs.prepare}
    print("| prompt | processor: wall / CPU (ms) | ting: wall / CPU (ms) | CPU ratio |")
    print("|---|---|---|---|")
    for name, messages in cases().items():
        a, b = (way(messages) for way in ways.values())
        assert (a.token_ids, a.audio_tokens, a.audio_hashes) == (b.token_ids, b.audio_tokens, b.audio_hashes)
        times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in ways}
        for i in range(args.repeats + 5):
            for key in list(ways)[:: 1 if i % 2 else -1]:
                wall, cpu = time.perf_counter(), time.process_time()
                ways[key](messages)
                if i >= 5:  # the first calls warm up
                    times[key][0].append(time.perf_counter() - wall)
                    times[key][1].append(time.process_time() - cpu)
        med = {k: [statistics.median(v) * 1000 for v in pair] for k, pair in times.items()}
        p, t = med["processor"], med["ting"]
        print(f"| {name} | {p[0]:.2f} / {p[1]:.2f} | {t[0]:.2f} / {t[1]:.2f} | {p[1] / t[1]:.2f}x |")


if __name__ == "__main__":
    main()
