"""The plain-WAV fast path (audio/wav.py) against FFmpeg's path (decode.decode_bytes): for every file, either the
same clip bit for bit and the same error, or no answer (the file goes to FFmpeg). Never a crash."""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import Callable

import numpy as np
import pytest

from tests import corpus as C
from ting import errors
from ting.audio import AudioLoader, AudioSources, HttpFetcher, MediaGuard
from ting.audio.decode import DecoderPool, decode_bytes
from ting.audio.wav import decode_plain_wav, plain_pcm
from ting.types import WINDOW_SAMPLES, AudioClip

RNG = np.random.default_rng(14)
PCM_GUID = bytes.fromhex("0100000000001000800000aa00389b71")


def chunk(chunk_id: bytes, body: bytes, *, size: int | None = None, pad: bool = True) -> bytes:
    declared = len(body) if size is None else size
    return chunk_id + struct.pack("<I", declared & 0xFFFFFFFF) + body + (b"\0" if pad and len(body) & 1 else b"")


def fmt_pcm(*, tag: int = 1, channels: int = 1, rate: int = 16000, bits: int = 16, extra: bytes = b"") -> bytes:
    block = channels * bits // 8
    return chunk(b"fmt ", struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits) + extra)


def fmt_extensible(*, mask: int = 4, valid_bits: int = 16, guid: bytes = PCM_GUID) -> bytes:
    base = struct.pack("<HHIIHH", 0xFFFE, 1, 16000, 32000, 2, 16)
    return chunk(b"fmt ", base + struct.pack("<HHI16s", 22, valid_bits, mask, guid))


def riff(*chunks: bytes, riff_size: int | None = None) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", (len(body) if riff_size is None else riff_size) & 0xFFFFFFFF) + body


def pcm(samples: int) -> bytes:
    """Random int16 samples, the extremes included (-32768 must become exactly -1.0)."""
    values = RNG.integers(-32768, 32768, size=samples, dtype=np.int64).astype("<i2")
    if samples >= 2:
        values[0], values[-1] = -32768, 32767
    return values.tobytes()


def plain(samples: int, **kw: int) -> bytes:
    return riff(fmt_pcm(), chunk(b"data", pcm(samples)), **kw)


LIST_INFO = chunk(b"LIST", b"INFO" + chunk(b"ISFT", b"Lavf60.16.100\0"))
SECOND = 16000
MiB = 1024 * 1024

# name -> WAV bytes. Names starting "fast_" must be taken by the fast path; the others may go either way.
CORPUS: dict[str, Callable[[], bytes]] = {
    "fast_2_6s": lambda: plain(41600),
    "fast_min": lambda: plain(400),
    "fast_under_min": lambda: plain(399),
    "fast_1_sample": lambda: plain(1),
    "fast_30s": lambda: plain(WINDOW_SAMPLES),
    "fast_30s_minus_1": lambda: plain(WINDOW_SAMPLES - 1),
    "fast_30s_plus_1": lambda: plain(WINDOW_SAMPLES + 1),
    "fast_45s": lambda: plain(45 * SECOND),
    "fast_odd_data_size": lambda: riff(fmt_pcm(), chunk(b"data", pcm(1000) + b"\x7f")),
    "fast_odd_data_size_no_pad": lambda: riff(fmt_pcm(), chunk(b"data", pcm(1000) + b"\x7f", pad=False)),
    "fast_single_odd_byte": lambda: riff(fmt_pcm(), chunk(b"data", b"\x7f")),
    "fast_list_before": lambda: riff(fmt_pcm(), LIST_INFO, chunk(b"data", pcm(8000))),
    "fast_list_after": lambda: riff(fmt_pcm(), chunk(b"data", pcm(8000)), LIST_INFO),
    "fast_list_utf8": lambda: riff(
        fmt_pcm(), chunk(b"LIST", b"INFO" + chunk(b"INAM", "Grüße\0".encode())), chunk(b"data", pcm(8000))
    ),
    "fast_list_both": lambda: riff(
        LIST_INFO, fmt_pcm(), chunk(b"JUNK", bytes(28)), chunk(b"data", pcm(8000)), LIST_INFO
    ),
    "id3_after": lambda: riff(fmt_pcm(), chunk(b"data", pcm(8000)), chunk(b"id3 ", b"ID3\x04\0\0\0\0\0\0")),
    "fast_riff_size_wrong": lambda: plain(8000, riff_size=12345),
    "fast_riff_size_streaming": lambda: plain(8000, riff_size=0xFFFFFFFF),
    "fast_fmt_18": lambda: riff(fmt_pcm(extra=b"\0\0"), chunk(b"data", pcm(8000))),
    "fast_extensible_fc": lambda: riff(fmt_extensible(), chunk(b"data", pcm(8000))),
    "fast_extensible_no_mask": lambda: riff(fmt_extensible(mask=0), chunk(b"data", pcm(8000))),
    "fast_silence": lambda: riff(fmt_pcm(), chunk(b"data", bytes(16000))),
    # Everything below goes to FFmpeg (or is taken, if it gives the same): the test asserts equality either way.
    "data_size_0": lambda: riff(fmt_pcm(), chunk(b"data", b"", size=0)) + pcm(8000),
    "data_size_0_empty": lambda: riff(fmt_pcm(), chunk(b"data", b"")),
    "data_size_streaming": lambda: riff(fmt_pcm(), chunk(b"data", b"", size=0xFFFFFFFF)) + pcm(8000),
    "data_size_streaming_45s": lambda: riff(fmt_pcm(), chunk(b"data", b"", size=0xFFFFFFFF)) + pcm(45 * SECOND),
    "data_larger_than_file": lambda: riff(fmt_pcm(), chunk(b"data", b"", size=64000)) + pcm(8000),
    "data_larger_than_file_45s": lambda: riff(fmt_pcm(), chunk(b"data", b"", size=2_000_000)) + pcm(45 * SECOND),
    "data_size_past_4_gib_pos": lambda: riff(fmt_pcm(), chunk(b"data", b"", size=0xFFFFFFFE)) + pcm(100),
    "header_only": lambda: riff(fmt_pcm()),
    "data_before_fmt": lambda: riff(chunk(b"data", pcm(8000)), fmt_pcm()),
    "two_fmt": lambda: riff(fmt_pcm(), fmt_pcm(rate=8000), chunk(b"data", pcm(8000))),
    "fact_before": lambda: riff(fmt_pcm(), chunk(b"fact", struct.pack("<I", 5)), chunk(b"data", pcm(8000))),
    "bext_before": lambda: riff(fmt_pcm(), chunk(b"bext", bytes(602)), chunk(b"data", pcm(8000))),
    "garbage_after": lambda: riff(fmt_pcm(), chunk(b"data", pcm(8000))) + b"garbage",
    "second_data_after": lambda: riff(fmt_pcm(), chunk(b"data", pcm(8000)), chunk(b"data", pcm(8000))),
    "list_too_short": lambda: riff(fmt_pcm(), chunk(b"LIST", b"IN"), chunk(b"data", pcm(8000))),
    "list_lies": lambda: riff(
        fmt_pcm(), chunk(b"LIST", b"INFO" + chunk(b"INAM", b"x", size=99999)), chunk(b"data", pcm(8000))
    ),
    "list_key_not_ascii": lambda: riff(
        fmt_pcm(), chunk(b"LIST", b"INFO" + chunk(b"\xff\xfe\0\1", b"abc")), chunk(b"data", pcm(8000))
    ),
    "list_value_not_utf8": lambda: riff(
        fmt_pcm(), chunk(b"LIST", b"INFO" + chunk(b"INAM", b"abc\xff")), chunk(b"data", pcm(8000))
    ),
    "list_value_not_utf8_after_nul": lambda: riff(
        fmt_pcm(), chunk(b"LIST", b"INFO" + chunk(b"INAM", b"abc\0\xff")), chunk(b"data", pcm(8000))
    ),
    "list_key_zero": lambda: riff(
        fmt_pcm(), chunk(b"LIST", b"INFO" + chunk(bytes(4), b"abc")), chunk(b"data", pcm(8000))
    ),
    "list_adtl": lambda: riff(
        fmt_pcm(), chunk(b"LIST", b"adtl" + chunk(b"labl", b"abcdefgh")), chunk(b"data", pcm(8000))
    ),
    "list_info_tail": lambda: riff(
        fmt_pcm(), chunk(b"LIST", b"INFO" + chunk(b"INAM", b"ab") + b"xyz"), chunk(b"data", pcm(8000))
    ),
    "list_too_short_after": lambda: riff(fmt_pcm(), chunk(b"data", pcm(8000)), chunk(b"LIST", b"IN")),
    "list_lies_after": lambda: riff(
        fmt_pcm(), chunk(b"data", pcm(8000)), chunk(b"LIST", b"INFO" + chunk(b"INAM", b"x", size=99999))
    ),
    "list_not_utf8_after": lambda: riff(
        fmt_pcm(), chunk(b"data", pcm(8000)), chunk(b"LIST", b"INFO" + chunk(b"INAM", b"\xc3("))
    ),
    "flood_of_junk_before": lambda: riff(fmt_pcm(), chunk(b"JUNK", b"") * 5000, chunk(b"data", pcm(8000))),
    "flood_of_junk_after": lambda: riff(fmt_pcm(), chunk(b"data", pcm(8000)), chunk(b"JUNK", b"") * 5000),
    "flood_of_tags": lambda: riff(
        fmt_pcm(), chunk(b"LIST", b"INFO" + chunk(b"INAM", b"") * 5000), chunk(b"data", pcm(8000))
    ),
    "long_tag": lambda: riff(
        fmt_pcm(), chunk(b"LIST", b"INFO" + chunk(b"ICMT", b"a" * 100_000)), chunk(b"data", pcm(8000))
    ),
    "chunk_past_end": lambda: riff(fmt_pcm(), chunk(b"JUNK", b"", size=1_000_000)),
    "fmt_truncated": lambda: riff(chunk(b"fmt ", struct.pack("<HHI", 1, 1, 16000))),
    "fmt_14": lambda: riff(chunk(b"fmt ", struct.pack("<HHIIH", 1, 1, 16000, 32000, 2)), chunk(b"data", pcm(8000))),
    "fmt_18_cb_size": lambda: riff(fmt_pcm(extra=b"\x02\0ab"), chunk(b"data", pcm(8000))),
    "fmt_block_align_4": lambda: riff(
        chunk(b"fmt ", struct.pack("<HHIIHH", 1, 1, 16000, 64000, 4, 16)), chunk(b"data", pcm(8000))
    ),
    "fmt_byte_rate_wrong": lambda: riff(
        chunk(b"fmt ", struct.pack("<HHIIHH", 1, 1, 16000, 1, 2, 16)), chunk(b"data", pcm(8000))
    ),
    "rate_8000": lambda: riff(fmt_pcm(rate=8000), chunk(b"data", pcm(8000))),
    "rate_48000": lambda: riff(fmt_pcm(rate=48000), chunk(b"data", pcm(48000))),
    "stereo": lambda: riff(fmt_pcm(channels=2), chunk(b"data", pcm(16000))),
    "u8": lambda: riff(fmt_pcm(bits=8), chunk(b"data", pcm(4000))),
    "s24": lambda: riff(fmt_pcm(bits=24), chunk(b"data", pcm(12000))),
    "s32": lambda: riff(fmt_pcm(bits=32), chunk(b"data", pcm(16000))),
    "float32": lambda: riff(fmt_pcm(tag=3, bits=32), chunk(b"data", np.float32(RNG.random(8000) - 0.5).tobytes())),
    "alaw": lambda: riff(fmt_pcm(tag=6, bits=8), chunk(b"data", pcm(4000))),
    "extensible_float": lambda: riff(
        fmt_extensible(guid=bytes.fromhex("0300000000001000800000aa00389b71")), chunk(b"data", pcm(8000))
    ),
    "extensible_12_bits": lambda: riff(fmt_extensible(valid_bits=12), chunk(b"data", pcm(8000))),
    "extensible_stereo_mask": lambda: riff(fmt_extensible(mask=3), chunk(b"data", pcm(8000))),
    "rifx": lambda: b"RIFX" + plain(8000)[4:],
    "rf64": lambda: b"RF64" + plain(8000)[4:],
    "spdif_sync": lambda: riff(fmt_pcm(), chunk(b"data", _spdif_burst() * 40)),
    "spdif_sync_late": lambda: riff(fmt_pcm(), chunk(b"data", pcm(20000) + _spdif_burst() * 40)),
    "riff_only": lambda: b"RIFF\0\0\0\0WAVE",
    "riff_short": lambda: b"RIFF\0\0\0\0WAV",
    "cut_in_chunk_header": lambda: riff(fmt_pcm()) + b"da",
}


def _spdif_burst() -> bytes:
    """An IEC 61937 burst (AC-3 data type) padded to one AC-3 frame's 6144 bytes."""
    return (struct.pack("<HHHH", 0xF872, 0x4E1F, 0x0001, 8 * 16) + bytes(16)).ljust(6144, b"\0")


def outcome(decode: Callable[[], AudioClip | None]) -> AudioClip | tuple[str, str] | None:
    try:
        return decode()
    except errors.AudioError as exc:
        return type(exc).__name__, exc.message


def assert_same(fast: AudioClip, slow: AudioClip) -> None:
    assert fast.samples.dtype == slow.samples.dtype == np.float32
    assert fast.samples.shape == slow.samples.shape
    assert np.array_equal(fast.samples, slow.samples)
    assert fast.samples.tobytes() == slow.samples.tobytes()  # -0.0 and NaN alike, bit for bit
    assert not fast.samples.flags.writeable  # kept clips are shared between requests, as the workers' are
    assert (fast.duration_s, fast.truncated, fast.container, fast.codec) == (
        slow.duration_s,
        slow.truncated,
        slow.container,
        slow.codec,
    )


CASES = [
    (name, max_samples, refuse)
    for name in CORPUS
    for max_samples in (WINDOW_SAMPLES, 10 * 60 * SECOND)
    for refuse in (False, True)
]


@pytest.mark.parametrize(("name", "max_samples", "refuse_longer"), CASES)
def test_the_fast_path_gives_what_ffmpeg_gives_or_nothing(name: str, max_samples: int, refuse_longer: bool) -> None:
    data = CORPUS[name]()
    fast = outcome(lambda: decode_plain_wav(data, max_samples=max_samples, refuse_longer=refuse_longer))
    if name.startswith("fast_"):
        assert fast is not None, "this plain WAV should not need FFmpeg"
    if fast is None:
        return
    slow = outcome(lambda: decode_bytes(data, max_samples=max_samples, refuse_longer=refuse_longer))
    if isinstance(fast, AudioClip) and isinstance(slow, AudioClip):
        assert_same(fast, slow)
    else:
        assert fast == slow


@pytest.mark.parametrize("name", ["flood_of_junk_before", "flood_of_junk_after", "flood_of_tags", "long_tag"])
def test_floods_of_chunks_and_long_tags_are_left_to_ffmpeg(name: str) -> None:
    """The server process walks a bounded number of chunks and tag bytes; past that, a worker takes the file."""
    assert plain_pcm(CORPUS[name]()) is None


def test_every_cut_of_a_plain_wav_is_the_same_or_left_to_ffmpeg() -> None:
    """Hostile truncation: the file cut at every offset through its header and into its data."""
    data = riff(fmt_pcm(), LIST_INFO, chunk(b"data", pcm(800)), LIST_INFO)
    for end in [*range(0, 120), *range(len(data) - 60, len(data) + 1)]:
        cut = data[:end]
        fast = outcome(lambda: decode_plain_wav(cut, max_samples=WINDOW_SAMPLES))  # noqa: B023
        if fast is None:
            continue
        slow = outcome(lambda: decode_bytes(cut))  # noqa: B023
        if isinstance(fast, AudioClip) and isinstance(slow, AudioClip):
            assert_same(fast, slow)
        else:
            assert fast == slow, end


def test_random_headers_never_crash_the_fast_path() -> None:
    """Bytes flipped in a plain WAV's header: the fast path answers the same as FFmpeg, or leaves it to FFmpeg."""
    base = bytearray(riff(fmt_pcm(), chunk(b"data", pcm(1200))))
    rng = np.random.default_rng(7)
    taken = 0
    for _ in range(300):
        data = bytearray(base)
        for position in rng.integers(0, 44, size=int(rng.integers(1, 4))):
            data[int(position)] = int(rng.integers(0, 256))
        fast = outcome(lambda: decode_plain_wav(bytes(data), max_samples=WINDOW_SAMPLES))  # noqa: B023
        if fast is None:
            continue
        taken += 1
        slow = outcome(lambda: decode_bytes(bytes(data)))  # noqa: B023
        if isinstance(fast, AudioClip) and isinstance(slow, AudioClip):
            assert_same(fast, slow)
        else:
            assert fast == slow
    assert taken > 0  # some flips (in sizes the fast path checks and does not need) still leave a plain WAV


def test_a_python_wave_module_file_takes_the_fast_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = C.write_wav(tmp_path / "tone.wav", C.tone(2.6)).read_bytes()
    clip = decode_plain_wav(data, max_samples=WINDOW_SAMPLES)
    assert clip is not None
    assert_same(clip, decode_bytes(data))


# --- through the pool: no worker is asked ---------------------------------------------------------------------


async def test_the_pool_decodes_plain_wav_without_a_worker(test_pythonpath) -> None:  # type: ignore[no-untyped-def]
    """Workers that hang on every WAV: a plain one is still decoded (in the server process), any other WAV still
    goes to a worker (and times out here), and refusals come back as the same errors."""
    pool = DecoderPool(1, timeout_s=1.0, target="tests.audio.workers:hang_on_riff")
    await pool.start()
    try:
        data = plain(41600)
        clip = await pool.decode(data)
        assert_same(clip, decode_bytes(data))
        long = plain(45 * SECOND)
        clip = await pool.decode(long, max_seconds=30)
        assert clip.truncated and len(clip.samples) == WINDOW_SAMPLES and clip.duration_s == 45.0
        clip = await pool.decode(long, max_seconds=600, refuse_longer=False)
        assert_same(clip, decode_bytes(long, max_samples=600 * SECOND))
        with pytest.raises(errors.AudioTooLong, match="longer than 30s"):
            await pool.decode(long, max_seconds=30, refuse_longer=True)
        with pytest.raises(errors.AudioTooShort):
            await pool.decode(plain(399))
        assert pool.restarts == 0
        with pytest.raises(errors.DecodeTimeout):
            await pool.decode(riff(fmt_pcm(rate=8000), chunk(b"data", pcm(8000))))
        assert pool.restarts == 1
    finally:
        await pool.close()


class _Observer:
    def __init__(self) -> None:
        self.fetches: list[str] = []
        self.decodes: list[Exception | None] = []

    def fetched(self, source: str, seconds: float, error: Exception | None) -> None:
        self.fetches.append(source)

    def decoded(self, seconds: float, error: Exception | None) -> None:
        self.decodes.append(error)


async def test_a_fast_path_decode_is_still_a_decode_for_the_metrics(decoder_pool: DecoderPool) -> None:
    """A data: URI through the loader, as a chat request's audio: fetched, then decoded (here, without a worker)."""
    observer = _Observer()
    sources = AudioSources(HttpFetcher(MediaGuard(), max_bytes=MiB), None, max_bytes=10 * MiB)
    loader = AudioLoader(sources, decoder_pool, observer=observer)
    try:
        clip = await loader.load("data:audio/wav;base64," + base64.b64encode(plain(41600)).decode())
        assert len(clip.samples) == 41600 and (clip.container, clip.codec) == ("wav", "pcm_s16le")
        with pytest.raises(errors.AudioTooShort):
            await loader.load("data:audio/wav;base64," + base64.b64encode(plain(10)).decode())
        assert observer.fetches == ["data", "data"]
        assert len(observer.decodes) == 2
        assert observer.decodes[0] is None and isinstance(observer.decodes[1], errors.AudioTooShort)
    finally:
        await loader.sources.fetcher.aclose()


async def test_concurrent_fast_decodes_are_independent(decoder_pool: DecoderPool) -> None:
    files = [plain(int(n)) for n in RNG.integers(400, 3 * SECOND, size=16)]
    clips = await asyncio.gather(*(decoder_pool.decode(f) for f in files))
    for data, clip in zip(files, clips, strict=True):
        assert_same(clip, decode_bytes(data))
