"""Transcripts and translations of whole recordings, on the same engine as chat.

Qwen2-Audio hears 30 s at a time. A recording (up to --max-transcription-s) is cut into windows of at most
30 s, each cut placed at the quietest 20 ms in the last 5 s before the limit so that words are rarely split;
the windows are transcribed concurrently (the engine batches them) and joined. Each window is a timed
segment, which is what SRT, WebVTT and verbose_json need.

The Instruct model likes to wrap a transcript ("The original content of this audio is: '...'",
"这段音频说的是：'...'"); `clean_transcript` takes such wrapping off so the transcript is the words alone.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ting.audio import AudioLoader, billed_audio_tokens
from ting.engine import EngineClient, Prompt, Sampling
from ting.errors import AudioError
from ting.service.chat import Models, first_error
from ting.service.language import ANSWER_SAMPLING, language_from_answer, question
from ting.service.lifecycle import Call, Lifecycle, Report, Ticket
from ting.types import (
    MIN_SAMPLES,
    SAMPLE_RATE,
    WINDOW_SAMPLES,
    AudioClip,
    AudioPart,
    ChatRequest,
    GenerationChunk,
    Message,
    SamplingParams,
    TextPart,
    Usage,
)

SEARCH_SAMPLES = 5 * SAMPLE_RATE  # where to look for a quiet place to cut, before each 30 s limit
FRAME_SAMPLES = 320  # 20 ms energy frames

LANGUAGES = {
    "en": "English",
    "zh": "Chinese",
    "yue": "Cantonese",
    "fr": "French",
    "it": "Italian",
    "es": "Spanish",
    "de": "German",
    "ja": "Japanese",
    "ko": "Korean",
    "ru": "Russian",
    "pt": "Portuguese",
    "ar": "Arabic",
    "nl": "Dutch",
    "tr": "Turkish",
    "vi": "Vietnamese",
    "th": "Thai",
    "id": "Indonesian",
    "hi": "Hindi",
}

_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "「": "」", "『": "』", "《": "》"}
_OPENING = "[\"'“‘「『《]"
_PREAMBLE = re.compile(
    r"""^\s*(?:
      (?:sure|okay|ok|certainly|of\ course)[,!.]?\s*
        (?:here\ (?:is|are)|here's)\ (?:the\ )?(?:transcription|transcript|translation|text)[^:：\n]*[:：]\s*
    | (?:here\ (?:is|are)|here's)\ (?:the\ )?(?:transcription|transcript|translation|text)[^:：\n]*[:：]\s*
    | (?:the\ )?(?:original\ )?(?:content|speech|words|transcription|transcript|text)
        \ (?:of|in)\ (?:this|the)\ (?:audio|speech|recording|clip)(?:\ (?:is|says|reads|goes))?
        \s*(?:[:：]\s*|(?=OPEN))
    | (?:in\ )?(?:the|this)\ (?:audio|recording|clip)[,]?\ (?:the\ )?(?:speaker|person|man|woman|voice)?\s*
        (?:says|said|is\ saying|states)\s*(?:[:：]\s*|(?=OPEN))
    | (?:the\ )?(?:speaker|person|man|woman|voice)\ (?:says|said|is\ saying|states)\s*(?:[:：]\s*|(?=OPEN))
    | (?:transcription|transcript|translation|english\ translation)\s*[:：]\s*
    | (?:这段|该|此|这个)?(?:音频|语音|录音)(?:中|里)?(?:的)?(?:原始)?(?:内容)?
        (?:是|说的是|说的|讲的是|为|说)\s*(?:[:：]\s*|(?=OPEN))
    | (?:说话人|说话者|他|她)(?:说的是|说)\s*(?:[:：]\s*|(?=OPEN))
    | (?:转写|转录|识别|翻译)(?:结果|内容|文本)?(?:是|为)?\s*[:：]\s*
    )""".replace("OPEN", _OPENING),
    re.X | re.I,
)


def clean_transcript(text: str) -> str:
    """The words alone: no preamble ("The audio says: ..."), no quotation marks around them."""
    out = text.strip()
    match = _PREAMBLE.match(out)
    if match and match.end() < len(out):
        out = out[match.end() :].strip()
    for _ in range(2):  # 'Hello.' and "'Hello'." both lose their quotes
        if len(out) >= 2 and out[0] in _QUOTES:
            closing = _QUOTES[out[0]]
            body, tail = (out[1:-1], "") if out.endswith(closing) else (out[1:-2], out[-1])
            if (out.endswith(closing) or (out[-2] == closing and tail in ".。!！?？")) and closing not in body:
                out = (body + tail).strip()
                continue
        break
    return out


@dataclass(frozen=True)
class Segment:
    start_s: float
    end_s: float
    text: str


@dataclass(frozen=True)
class Transcript:
    task: str  # transcribe | translate
    text: str
    segments: tuple[Segment, ...]
    language: str | None  # as asked for, or as the model answered when asked (detect_language), else None
    duration_s: float
    usage: Usage


def windows(samples: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) sample ranges of at most 30 s, cut at the quietest 20 ms before each limit."""
    spans: list[tuple[int, int]] = []
    start = 0
    while len(samples) - start > WINDOW_SAMPLES:
        lo, hi = start + WINDOW_SAMPLES - SEARCH_SAMPLES, start + WINDOW_SAMPLES
        frames = samples[lo:hi].reshape(-1, FRAME_SAMPLES)
        cut = lo + int(np.argmin((frames.astype(np.float64) ** 2).mean(axis=1))) * FRAME_SAMPLES
        spans.append((start, cut))
        start = cut
    if len(samples) - start >= MIN_SAMPLES or not spans:
        spans.append((start, len(samples)))
    return spans


def instruction(task: str, language: str | None, prompt: str | None, target: str) -> str:
    spoken = f" (spoken in {LANGUAGES.get(language, language)})" if language else ""
    if task == "translate":
        text = (
            f"Translate the speech in this audio{spoken} into {LANGUAGES.get(target, target)}. "
            f"Reply with the translation only: no introduction, no explanation, no quotation marks."
        )
    else:
        text = (
            f"Transcribe the speech in this audio{spoken} exactly as it is spoken. "
            f"Reply with the transcript only: no introduction, no explanation, no quotation marks."
        )
    if prompt:
        text += f"\nContext that may help with names and spelling: {prompt.strip()[:1000]}"
    return text


def join_windows(parts: list[str]) -> str:
    """Window texts joined into one transcript (a space between words, none between CJK characters)."""
    out = ""
    for part in (p for p in parts if p):
        if out and not (_cjk(out[-1]) and _cjk(part[0])):
            out += " "
        out += part
    return out


def _cjk(ch: str) -> bool:
    return "\u3000" <= ch <= "\u9fff" or "\uac00" <= ch <= "\ud7af" or "\uff00" <= ch <= "\uffef"


class TranscriptionService:
    def __init__(
        self, lifecycle: Lifecycle, engine: EngineClient, audio: AudioLoader, models: Models, *, max_seconds: float
    ) -> None:
        self.lifecycle, self.engine, self.audio, self.models = lifecycle, engine, audio, models
        self.max_seconds = max_seconds

    async def run(
        self,
        data: bytes,
        call: Call,
        *,
        task: str = "transcribe",
        language: str | None = None,
        prompt: str | None = None,
        temperature: float | None = None,
        target: str = "en",
        detect_language: bool = False,
        on_text: Callable[[int, str], None] | None = None,
    ) -> Transcript:
        """Transcribe (or translate) a whole recording: one request, one ledger row.

        The windows run together; if one fails (the engine's queue is full, say) the others are cancelled, and
        the request is charged what ran. `on_text(i, text)` receives each window's text as soon as it is done
        (windows finish in any order). With `detect_language` and no `language`, the model is also asked which
        language the first window is in.
        """
        ticket = await self.lifecycle.admit(call, task=task)
        async with ticket:
            limits = self.models.get(call.request.model)
            clip = await self.audio.decode(data, max_seconds=self.max_seconds, refuse_longer=True)
            if clip.truncated:
                raise AudioError(f"The input audio is longer than {self.max_seconds:g}s.")
            ticket.audio_seconds = clip.seconds
            spans = windows(clip.samples)
            text = instruction(task, language and language.lower(), prompt, target)
            parts = [
                AudioClip(clip.samples[a:b], (b - a) / SAMPLE_RATE, False, clip.container, clip.codec) for a, b in spans
            ]
            asks: list[tuple[Message, ...]] = [
                (Message("user", (AudioPart("upload", p), TextPart(text))),) for p in parts
            ]
            asking = detect_language and language is None
            clips = [*parts, parts[0]] if asking else parts
            if asking:
                asks.append(question(parts[0]))  # one more prompt: its answer is the last result
            prompts = await asyncio.gather(*(self.engine.prepare(m) for m in asks))
            params = SamplingParams(
                temperature=0.0 if temperature is None else temperature,
                max_tokens=limits.max_output_tokens,
                repetition_penalty=1.05,
            )
            samplings = [
                self.engine.resolve(ANSWER_SAMPLING if i == len(parts) else params, pr) for i, pr in enumerate(prompts)
            ]
            billed = [billed_audio_tokens(len(c.samples)) for c in clips]
            await ticket.reserve(
                sum(pr.text_tokens + b + s.max_tokens for pr, b, s in zip(prompts, billed, samplings, strict=True))
            )
            words: dict[int, str] = {}

            def window_done(i: int, answer: str) -> None:
                if i < len(parts):
                    words[i] = clean_transcript(answer)
                    if on_text is not None:
                        on_text(i, words[i])

            answers = await self._generate(ticket, prompts, samplings, billed, window_done)
            segments = tuple(Segment(a / SAMPLE_RATE, b / SAMPLE_RATE, words[i]) for i, (a, b) in enumerate(spans))
            if asking:
                language = language_from_answer(answers[-1])
        return Transcript(
            task=task,
            text=join_windows([s.text for s in segments]),
            segments=segments,
            language=language,
            duration_s=round(clip.seconds, 3),
            usage=ticket.usage,
        )

    async def _generate(
        self,
        ticket: Ticket,
        prompts: list[Prompt],
        samplings: list[Sampling],
        billed: list[int],
        done: Callable[[int, str], None],
    ) -> list[str]:
        """Every prompt's answer (`done(i, answer)` as each ends); `ticket.usage` counts the prompts that ran, as
        they run."""
        ran = [False] * len(prompts)
        output_tokens = [0] * len(prompts)
        answers = [""] * len(prompts)

        def count(i: int, chunk: GenerationChunk) -> None:
            ran[i], output_tokens[i] = True, chunk.usage.output_tokens
            ticket.usage = Usage(
                input_tokens=sum(p.text_tokens for p, r in zip(prompts, ran, strict=True) if r),
                audio_tokens=sum(b for b, r in zip(billed, ran, strict=True) if r),
                output_tokens=sum(output_tokens),
            )

        async def one(i: int) -> None:
            out = []
            async for chunk in self.engine.generate(
                prompts[i], samplings[i], request_id=ticket.request_id, cache_salt=ticket.cache_salt
            ):
                count(i, chunk)
                out.append(chunk.text)
            answers[i] = "".join(out)
            done(i, answers[i])

        try:
            async with asyncio.TaskGroup() as group:  # one window failing cancels the others
                for i in range(len(prompts)):
                    group.create_task(one(i))
        except BaseExceptionGroup as failed:
            raise first_error(failed) from None
        return answers


def transcription_call(
    model: str, protocol: str, token: str | None, request_id: str, report: Report | None = None
) -> Call:
    """A Call for a transcription: its ChatRequest only names the model (the audio comes as bytes)."""
    return Call(ChatRequest(model=model, messages=()), protocol, token, request_id, report=report or Report())
