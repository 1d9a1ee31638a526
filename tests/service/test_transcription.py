"""Transcripts: the words alone, and long recordings cut at quiet places."""

from __future__ import annotations

import numpy as np
import pytest

from ting.service.transcription import clean_transcript, windows

WRAPPED = [
    ('The original content of this audio is: "Hello, and welcome to Ting."', "Hello, and welcome to Ting."),
    ("The original content of this audio is:'Hello world.'", "Hello world."),
    ("The audio says: 'I will be there at five.'", "I will be there at five."),
    ('The speaker says: "Good morning everyone."', "Good morning everyone."),
    ('In the audio, the speaker says "we\'re late".', "we're late."),
    ("Transcription: the quick brown fox", "the quick brown fox"),
    ("Sure! Here is the transcription of the audio:\nThe meeting starts at ten.", "The meeting starts at ten."),
    ("Here's the transcript: I like green tea.", "I like green tea."),
    ("The speech in the audio is: Please close the door.", "Please close the door."),
    ("这段音频说的是:'欢迎使用阿里云'", "欢迎使用阿里云"),  # the hosted API's own example answer
    ("这段音频的原始内容是：'你好，今天天气很好。'", "你好，今天天气很好。"),
    ("音频中说的是：“请把门关上。”", "请把门关上。"),
    ("语音内容是：我们明天见。", "我们明天见。"),
    ("说话人说：「今天下午三点开会」", "今天下午三点开会"),
    ("转写结果：谢谢收听", "谢谢收听"),
    ('"Just the words, in quotes."', "Just the words, in quotes."),
    ("'Quoted with a period outside'.", "Quoted with a period outside."),
]

UNTOUCHED = [
    "Hello, and welcome to Ting.",
    "The speaker says hello to the audience and leaves.",  # no colon or quote: the speech itself
    "The audio system is broken: please call support.",
    "Content of this kind is not allowed",
    "他说得对。",
    "'Tis the season.",
    '"Yes," she said, "of course."',
    "",
]


@pytest.mark.parametrize(("raw", "words"), WRAPPED)
def test_wrapping_is_taken_off(raw: str, words: str) -> None:
    assert clean_transcript(raw) == words


@pytest.mark.parametrize("text", UNTOUCHED)
def test_plain_transcripts_are_left_alone(text: str) -> None:
    assert clean_transcript(text) == text


def test_short_audio_is_one_window() -> None:
    assert windows(np.zeros(16000 * 12, dtype=np.float32)) == [(0, 192000)]
    assert windows(np.zeros(480000, dtype=np.float32)) == [(0, 480000)]


def test_long_audio_is_cut_at_the_quietest_place_before_each_limit() -> None:
    rng = np.random.default_rng(0)
    samples = (0.3 * rng.standard_normal(16000 * 75)).astype(np.float32)
    quiet = [27 * 16000, 54 * 16000 + 3200]  # 20 ms of silence in each search zone
    for q in quiet:
        samples[q : q + 320] = 0
    spans = windows(samples)
    assert [a for a, _ in spans] == [0, *quiet]
    assert spans[-1][1] == len(samples)
    assert all(b - a <= 480000 for a, b in spans)
    assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))  # contiguous, nothing lost
