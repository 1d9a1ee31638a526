"""Domain messages -> the input of the checkpoint's own chat template.

The template (ChatML with `Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>` lines) does the rendering; this
module only shapes the messages the way it expects: list content for user turns, with an audio item per
clip in the order the user gave them (the template numbers them across the whole conversation), plain
string content for system and assistant turns. With no system message the template adds its default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ting.types import AudioClip, AudioPart, Message, TextPart


def template_messages(messages: Sequence[Message]) -> tuple[list[dict[str, Any]], list[AudioClip]]:
    """The template's messages, and the decoded clips in the order their placeholders appear.

    The wire protocols refuse malformed conversations in their own words (api/<protocol>/convert.py); here a
    malformed one is a bug, and raises ValueError.
    """
    if not any(m.role == "user" for m in messages):
        raise ValueError("a conversation needs a user message")
    shaped: list[dict[str, Any]] = []
    clips: list[AudioClip] = []
    for i, message in enumerate(messages):
        if message.role == "system" and i != 0:
            raise ValueError("the system message must come first")
        if message.role == "user":
            content: list[dict[str, str]] = []
            for part in message.parts:
                if isinstance(part, AudioPart):
                    if part.clip is None:
                        raise ValueError("audio must be decoded before the prompt is built")
                    content.append({"type": "audio", "audio": ""})  # the template counts it; the URL is not rendered
                    clips.append(part.clip)
                elif isinstance(part, TextPart):
                    content.append({"type": "text", "text": part.text})
            shaped.append({"role": "user", "content": content})
        else:
            if any(isinstance(p, AudioPart) for p in message.parts):
                raise ValueError(f"audio in a {message.role} message")
            text = "".join(p.text for p in message.parts if isinstance(p, TextPart))
            shaped.append({"role": message.role, "content": text})
    return shaped, clips
