"""Streaming detokenisation: no partial UTF-8 character, nothing past a stop string."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from ting.engine.detokenize import IncrementalDecoder


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(tiny_dir)


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDecoder]:  # type: ignore[no-untyped-def]
    decoder = IncrementalDecoder(lambda t: tokenizer.decode(list(t), skip_special_tokens=True), stop)
    deltas = [decoder.push(i) for i in ids]
    deltas.append(decoder.flush())
    return deltas, decoder


def test_chinese_streams_whole_characters(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "你好，欢迎使用听。钢琴曲很好听，小提琴也很美。"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > len(text) // 2  # many characters span several byte tokens
    deltas, _ = stream(tokenizer, ids)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d) > 5  # it really streamed


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("abc xyz.,!?你好世界音频钢琴🎵é\n")), min_size=1, max_size=60))
def test_property_deltas_add_up_to_the_decoded_text(tokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    deltas, _ = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


@settings(max_examples=150, deadline=None)
@given(
    before=st.text(alphabet="ab 你好.", max_size=20),
    after=st.text(alphabet="ab 你好.", max_size=20),
    stop=st.sampled_from(["STOP", "\n\n", "好。", "Observation:"]),
)
def test_property_nothing_past_a_stop_string_is_released(tokenizer, before: str, after: str, stop: str) -> None:  # type: ignore[no-untyped-def]
    text = before + stop + after
    ids = tokenizer(text, add_special_tokens=False).input_ids
    deltas, decoder = stream(tokenizer, ids, stop=(stop, "never-appears"))
    expected = text[: text.find(stop)]
    assert decoder.stopped
    assert "".join(deltas) == expected == decoder.text
    for i in range(len(deltas)):  # at no point did the stream show text past the cut
        assert expected.startswith("".join(deltas[: i + 1]))


def test_a_partial_stop_string_is_held_then_released(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer("The end is ST and more", add_special_tokens=False).input_ids
    deltas, decoder = stream(tokenizer, ids, stop=("STOP",))
    assert not decoder.stopped
    assert "".join(deltas) == "The end is ST and more"


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def by_chars(ids) -> str:  # type: ignore[no-untyped-def]
    return "".join(chr(i) for i in ids)


def first_stop(text: str, stops: list[str]) -> int:
    """Reference: where the first stop string to end in `text` begins (-1: none)."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if s and text[:end].endswith(s)]
        if ending:
            return end - max(map(len, ending))
    return -1


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc你", max_size=40),
    stops=st.lists(st.text(alphabet="abc你", min_size=1, max_size=5), min_size=1, max_size=8),
)
def test_property_many_stops_cut_at_the_first_one_to_end(text: str, stops: list[str]) -> None:
    decoder = IncrementalDecoder(by_chars, stops)
    deltas = [decoder.push(i) for i in chars(text)]
    deltas.append(decoder.flush())
    cut = first_stop(text, stops)
    expected = text if cut < 0 else text[:cut]
    assert decoder.stopped == (cut >= 0)
    assert "".join(deltas) == expected == decoder.text
    for i in range(len(deltas)):  # nothing past the cut was ever released
        assert expected.startswith("".join(deltas[: i + 1]))


class Watched(str):
    """A stop string that counts every time the decoder looks at it."""

    looks = 0

    def __len__(self) -> int:
        Watched.looks += 1
        return super().__len__()

    def __getitem__(self, key):  # type: ignore[no-untyped-def]
        Watched.looks += 1
        return super().__getitem__(key)

    def __iter__(self):  # type: ignore[no-untyped-def]
        Watched.looks += 1
        return super().__iter__()


def test_a_long_stop_list_costs_nothing_per_token() -> None:
    stops = [Watched(f"<never {i}>") for i in range(2000)] + [Watched("THE END")]
    decoder = IncrementalDecoder(by_chars, stops)
    looks = Watched.looks
    text = "a long answer that goes on and on, " * 20 + "and then THE END and more"
    released = "".join(decoder.push(i) for i in chars(text))
    assert Watched.looks == looks  # the stop strings were read once, when the request started
    assert decoder.stopped and released == text[: text.find("THE END")]
