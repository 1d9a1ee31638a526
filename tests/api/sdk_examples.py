"""The hosted API's Python examples, run by whatever dashscope SDK is on sys.path (used for 1.14.1).

usage: python sdk_examples.py BASE_URL AUDIO_URL LOCAL_FILE B64_FILE
Prints one JSON object per example: what the SDK parsed.
"""

from __future__ import annotations

import base64
import json
import sys

import dashscope
from dashscope import MultiModalConversation

base_url, audio_url, local_file, b64_file = sys.argv[1:5]
dashscope.base_http_api_url = base_url
dashscope.api_key = "sk-any"
greedy = dict(temperature=0, max_tokens=16, seed=1)


def report(name, response):  # type: ignore[no-untyped-def]
    item = {
        "example": name,
        "status_code": response.status_code,
        "code": response.code,
        "message": response.message,
        "request_id": response.request_id,
    }
    if response.status_code == 200:
        choice = response.output.choices[0]
        content = choice.message.content  # [] in the last event of an incremental stream, as the hosted API's
        item.update(
            text=content[0]["text"] if content else None,
            role=choice.message.role,
            finish_reason=choice.finish_reason,
            usage=dict(response.usage),
        )
    print(json.dumps(item, ensure_ascii=False), flush=True)


ask = [{"role": "user", "content": [{"audio": audio_url}, {"text": "这段音频在说什么?"}]}]
first = MultiModalConversation.call(model="qwen-audio-turbo-latest", messages=ask, **greedy)
report("quick start", first)
ask += [
    {"role": "assistant", "content": [{"text": first.output.choices[0].message.content[0]["text"]}]},
    {"role": "user", "content": [{"text": "介绍一下这家公司?"}]},
]
report("multi-turn", MultiModalConversation.call(model="qwen-audio-turbo-latest", messages=ask, **greedy))
for incremental in (True, False):
    parts = list(
        MultiModalConversation.call(
            model="qwen-audio-turbo-latest", stream=True, incremental_output=incremental, messages=ask[:1], **greedy
        )
    )
    for p in parts:
        report(f"stream incremental={incremental}", p)
report(
    "voice chat",
    MultiModalConversation.call(
        model="qwen-audio-turbo", **greedy, messages=[{"role": "user", "content": [{"audio": audio_url}]}]
    ),
)
report(
    "local file",
    MultiModalConversation.call(
        model="qwen-audio-turbo",
        **greedy,
        messages=[{"role": "user", "content": [{"audio": f"file://{local_file}"}, {"text": "说了什么?"}]}],
    ),
)
with open(b64_file, "rb") as f:
    data = base64.b64encode(f.read()).decode()
report(
    "base64",
    MultiModalConversation.call(
        model="qwen-audio-turbo",
        **greedy,
        messages=[{"role": "user", "content": [{"audio": f"data:;base64,{data}"}, {"text": "说了什么?"}]}],
    ),
)
report(
    "error",
    MultiModalConversation.call(
        model="qwen-audio-turbo", messages=[{"role": "user", "content": [{"audio": "ftp://example.com/a.mp3"}]}]
    ),
)
