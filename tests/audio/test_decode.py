"""Decoding: every format to its true duration, and every bad input to its own error."""

from __future__ import annotations

import asyncio
import io
import subprocess
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest

from tests import corpus as C
from tests.audio.workers import count_decoded_packets
from ting import errors
from ting.audio.decode import DecoderPool, decode_bytes, sniff
from ting.audio.tokens import audio_tokens

FORMAT_NAMES = [f"{fmt}_{lang}" for fmt in C.FORMATS for lang in C.SPEECH]


@pytest.mark.parametrize("name", FORMAT_NAMES)
async def test_every_format_decodes_to_its_true_duration(corpus, decoder_pool: DecoderPool, name: str) -> None:
    sample = corpus[name]
    clip = await decoder_pool.decode(sample.path.read_bytes())
    assert (clip.container, clip.codec) == (sample.container, sample.codec)
    assert abs(clip.seconds - sample.duration_s) <= sample.tolerance_s, (clip.seconds, sample.duration_s)
    assert not clip.truncated
    assert clip.samples.dtype == np.float32 and clip.samples.ndim == 1
    assert float(np.abs(clip.samples).max()) <= 1.0
    assert float(np.sqrt(np.mean(clip.samples**2))) > 0.01  # speech, not silence
    expected_tokens = audio_tokens(round(sample.duration_s * 16000))
    assert abs(audio_tokens(len(clip.samples)) - expected_tokens) <= max(1, round(sample.tolerance_s * 25))


def test_the_container_is_sniffed_from_bytes_not_names(corpus, tmp_path: Path) -> None:
    wav = corpus["wav_pcm_s16_en"].path.read_bytes()
    assert sniff(wav) == "wav"
    misnamed = tmp_path / "really_a_wav.mp3"
    misnamed.write_bytes(wav)
    assert decode_bytes(misnamed.read_bytes()).container == "wav"
    for name, container in [
        ("mp3_vbr_id3_en", "mp3"),
        ("aac_adts_en", "aac"),
        ("amr_wb_en", "amr"),
        ("3gp_amr_nb_en", "mov"),
        ("webm_opus_en", "matroska"),
        ("flac_en", "flac"),
    ]:
        assert sniff(corpus[name].path.read_bytes()) == container


@pytest.mark.parametrize("builder", ["wav", "mp3"])
async def test_long_audio_stops_at_30_seconds_and_keeps_the_original_duration(
    decoder_pool: DecoderPool, tmp_path: Path, builder: str
) -> None:
    path = C.write_wav(tmp_path / "long.wav", C.tone(45.0))
    if builder == "mp3":
        path = C.ffmpeg(path, tmp_path / "long.mp3", "-c:a", "libmp3lame", "-b:a", "32k", "-f", "mp3")
    clip = await decoder_pool.decode(path.read_bytes())
    assert clip.truncated
    assert len(clip.samples) == 480_000
    assert clip.duration_s == pytest.approx(45.0, abs=0.06)
    assert audio_tokens(len(clip.samples)) == 750


async def test_silence_is_valid_audio(decoder_pool: DecoderPool, tmp_path: Path) -> None:
    clip = await decoder_pool.decode(C.write_wav(tmp_path / "silence.wav", np.zeros(32000)).read_bytes())
    assert len(clip.samples) == 32000 and not clip.samples.any()
    assert audio_tokens(len(clip.samples)) == 50


async def test_the_shortest_audio_the_model_can_hear(decoder_pool: DecoderPool, tmp_path: Path) -> None:
    clip = await decoder_pool.decode(C.write_wav(tmp_path / "a.wav", C.tone(400 / 16000)).read_bytes())
    assert len(clip.samples) == 400 and audio_tokens(400) == 1
    with pytest.raises(errors.AudioTooShort):
        await decoder_pool.decode(C.write_wav(tmp_path / "b.wav", C.tone(399 / 16000)).read_bytes())
    with pytest.raises(errors.AudioTooShort):
        await decoder_pool.decode(C.write_wav(tmp_path / "c.wav", C.tone(0.010)).read_bytes())


BAD_INPUTS = {
    "png": b"\x89PNG\r\n\x1a\n" + bytes(200),
    "html": b"<!DOCTYPE html><html><body>Not audio</body></html>",
    "text": "这不是音频。This is not audio.".encode(),
    "json": b'{"audio": "data:;base64,AAAA"}',
    "random": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "wav_header_only": C.wav_header(rate=16000, channels=1, data_bytes=0),
    "riff_avi": b"RIFF\x00\x10\x00\x00AVI LIST" + bytes(100),
    "hls_playlist": b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
    "ffconcat": b"ffconcat version 1.0\nfile '/etc/passwd'\n",
    "dash_mpd": b'<?xml version="1.0"?><MPD xmlns="urn:mpeg:dash:schema:mpd:2011"></MPD>',
    "id3_without_audio": b"ID3\x04\x00\x00\x00\x00\x00\x00",
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
async def test_things_that_are_not_audio_are_refused(decoder_pool: DecoderPool, name: str) -> None:
    with pytest.raises(errors.InvalidAudio) as info:
        await decoder_pool.decode(BAD_INPUTS[name])
    assert info.value.code == "InvalidParameter"
    assert info.value.message.startswith("The audio format is illegal and cannot be opened.")


async def test_empty_input_is_its_own_error(decoder_pool: DecoderPool) -> None:
    with pytest.raises(errors.AudioEmpty, match="The audio is empty"):
        await decoder_pool.decode(b"")


@pytest.mark.parametrize("fmt", list(C.FORMATS))
async def test_files_cut_short_decode_what_is_there(corpus, decoder_pool: DecoderPool, fmt: str) -> None:
    data = corpus[f"{fmt}_en"].path.read_bytes()
    full = await decoder_pool.decode(data)
    cut = data[: int(len(data) * 0.9)]
    if corpus[f"{fmt}_en"].container == "mov":
        # MP4-family files keep their index (moov) at the end: without it nothing can be decoded.
        with pytest.raises(errors.InvalidAudio):
            await decoder_pool.decode(cut)
        return
    clip = await decoder_pool.decode(cut)
    assert 0.6 * full.seconds < clip.seconds < full.seconds


async def test_a_corrupt_body_after_a_valid_header_is_refused(decoder_pool: DecoderPool, corpus) -> None:
    mp3 = corpus["mp3_cbr_en"].path.read_bytes()
    garbage = np.random.default_rng(1).integers(0, 256, 20000, dtype=np.uint8).tobytes()
    with pytest.raises(errors.AudioError):
        await decoder_pool.decode(mp3[:4] + garbage)


# --- bombs ---------------------------------------------------------------------------------------------------


async def test_a_two_hour_mp3_stops_after_30_seconds(decoder_pool: DecoderPool, tmp_path: Path) -> None:
    # 10 s of tone as raw MP3 frames, repeated: two hours of valid audio in a few MB.
    ten = C.raw_mp3_frames(C.write_wav(tmp_path / "t.wav", C.tone(10.0)), tmp_path / "t.mp3")
    bomb = ten.read_bytes() * 720
    assert len(bomb) < 10 * 1024 * 1024
    clip = await decoder_pool.decode(bomb)  # the pool's 10 s deadline would turn a full decode into an error
    assert clip.truncated and len(clip.samples) == 480_000


@pytest.mark.parametrize(("rate", "channels"), [(655_350, 8), (16_000, 255), (1, 1), (0, 1)])
async def test_forged_rates_and_channel_counts_are_refused(decoder_pool: DecoderPool, rate: int, channels: int) -> None:
    body = bytes(64_000)
    with pytest.raises((errors.UnsupportedCodec, errors.InvalidAudio)):
        await decoder_pool.decode(C.wav_header(rate=rate, channels=channels, data_bytes=len(body)) + body)


async def test_a_header_that_lies_about_its_length_decodes_what_is_there(decoder_pool: DecoderPool) -> None:
    pcm = (C.tone(1.0) * 32767).astype("<i2").tobytes()
    data = C.wav_header(rate=16000, channels=1, data_bytes=0xFFFFFFFF, riff_bytes=0xFFFFFFFF) + pcm
    clip = await decoder_pool.decode(data)
    assert len(clip.samples) == 16000


async def test_a_million_empty_packets_end_in_an_error(decoder_pool: DecoderPool) -> None:
    adts_header_only = bytes([0xFF, 0xF1, 0x50, 0x80, 0x00, 0xFF, 0xFC])  # frame length 7: no payload
    with pytest.raises(errors.AudioError):
        await decoder_pool.decode(adts_header_only * 1_400_000)


async def test_codecs_outside_the_allowlist_are_refused(decoder_pool: DecoderPool, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as out:
        stream = out.add_stream("wavpack", rate=16000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(
            (C.tone(1.0)[None, :] * 32767).astype(np.int16), format="s16p", layout="mono"
        )
        frame.sample_rate = 16000
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    with pytest.raises(errors.UnsupportedCodec, match="wavpack"):
        await decoder_pool.decode(buf.getvalue())


async def test_a_video_without_sound_is_refused(decoder_pool: DecoderPool, tmp_path: Path) -> None:
    path = tmp_path / "silent.mp4"
    subprocess.run(
        [
            "ffmpeg",
            "-hide_banner",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=32x32:rate=5",
            "-t",
            "1",
            "-c:v",
            "libx264",
            str(path),
        ],
        check=True,
    )
    with pytest.raises(errors.InvalidAudio, match="no audio track"):
        await decoder_pool.decode(path.read_bytes())


# --- channels -------------------------------------------------------------------------------------------------


async def test_stereo_is_downmixed_to_the_mean_of_both_channels(decoder_pool: DecoderPool, tmp_path: Path) -> None:
    left = C.tone(1.0, amplitude=0.8)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    clip = await decoder_pool.decode(C.write_wav(tmp_path / "l.wav", stereo, channels=2).read_bytes())
    assert len(clip.samples) == 16000  # packed stereo is not read as twice the length
    assert float(np.abs(clip.samples).max()) == pytest.approx(0.4, abs=0.01)
    both = np.stack([left, left], axis=1)
    clip = await decoder_pool.decode(C.write_wav(tmp_path / "both.wav", both, channels=2).read_bytes())
    assert float(np.abs(clip.samples).max()) == pytest.approx(0.8, abs=0.01)  # no gain, so no clipping
    inverted = np.stack([left, -left], axis=1)
    clip = await decoder_pool.decode(C.write_wav(tmp_path / "inv.wav", inverted, channels=2).read_bytes())
    assert float(np.abs(clip.samples).max()) < 0.001  # documented: opposite-phase channels cancel


async def test_surround_downmix_is_a_weighted_mean_without_lfe(decoder_pool: DecoderPool, tmp_path: Path) -> None:
    sig = C.tone(1.0, amplitude=0.8)
    src = tmp_path / "lfe.wav"
    six = np.zeros((len(sig), 6), dtype=np.float32)
    six[:, 3] = sig  # FL FR FC LFE BL BR: speech only in the LFE channel
    C.write_wav(tmp_path / "raw.wav", six, channels=6)
    C.ffmpeg(tmp_path / "raw.wav", src, "-channel_layout", "5.1", "-c:a", "pcm_s16le")
    clip = await decoder_pool.decode(src.read_bytes())
    assert float(np.abs(clip.samples).max()) < 0.001
    six[:, 3] = 0
    six[:, 2] = sig  # centre channel
    C.write_wav(tmp_path / "raw2.wav", six, channels=6)
    C.ffmpeg(tmp_path / "raw2.wav", src, "-channel_layout", "5.1", "-c:a", "pcm_s16le")
    clip = await decoder_pool.decode(src.read_bytes())
    assert float(np.abs(clip.samples).max()) > 0.1


# --- isolation -----------------------------------------------------------------------------------------------


async def test_a_crashing_decoder_fails_only_its_own_request(corpus, test_pythonpath) -> None:
    pool = DecoderPool(1, timeout_s=10.0, target="tests.audio.workers:crash_on_magic")
    await pool.start()
    try:
        with pytest.raises(errors.InvalidAudio, match="decoder failed"):
            await pool.decode(b"CRASH" + bytes(100))
        assert pool.restarts == 1
        clip = await pool.decode(corpus["wav_pcm_s16_en"].path.read_bytes())
        assert clip.seconds > 1.0
        assert pool.alive == 1
    finally:
        await pool.close()


async def test_a_hanging_decoder_is_killed_at_its_deadline(corpus, test_pythonpath) -> None:
    pool = DecoderPool(1, timeout_s=1.0, target="tests.audio.workers:hang_on_magic")
    await pool.start()
    try:
        with pytest.raises(errors.DecodeTimeout):
            await pool.decode(b"HANG" + bytes(100))
        assert pool.restarts == 1
        clip = await pool.decode(corpus["wav_pcm_s16_en"].path.read_bytes())
        assert clip.seconds > 1.0
    finally:
        await pool.close()


async def test_a_cancelled_request_does_not_lose_its_worker(corpus, decoder_pool: DecoderPool) -> None:
    import asyncio

    data = corpus["flac_en"].path.read_bytes()
    task = asyncio.ensure_future(decoder_pool.decode(data))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    clips = await asyncio.gather(*(decoder_pool.decode(data) for _ in range(4)))
    assert all(abs(c.seconds - clips[0].seconds) < 1e-9 for c in clips)
    assert decoder_pool.alive == decoder_pool.size


# --- recordings longer than a transcription may be ----------------------------------------------------------

TEN_MINUTES = 600 * 16000


@pytest.fixture(scope="module")
def long_recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not C.have("ffmpeg"):
        pytest.skip("ffmpeg is needed")
    return C.long_recordings(tmp_path_factory.mktemp("long"))


@pytest.fixture
def decoded_packets() -> Iterator[list[int]]:
    counts: list[int] = []
    restore = count_decoded_packets(counts.append)
    yield counts
    restore()


@pytest.mark.parametrize("name", ["opus_2h", "mp3_2h"])
def test_hours_of_audio_are_refused_by_their_length_before_decoding(
    long_recordings, decoded_packets, name: str
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(errors.AudioTooLong, match="longer than 600s"):
        decode_bytes(long_recordings[name].read_bytes(), max_samples=TEN_MINUTES, refuse_longer=True)
    assert decoded_packets and sum(decoded_packets) == 0  # containers were opened, no packet was decoded


def test_a_length_nothing_declares_is_still_refused_at_the_limit(long_recordings, decoded_packets) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(errors.AudioTooLong, match="longer than 600s"):
        decode_bytes(long_recordings["webm_11min"].read_bytes(), max_samples=TEN_MINUTES, refuse_longer=True)
    assert sum(decoded_packets) > 0  # decoded up to the limit, then refused


def test_a_wav_whose_header_claims_4_gib_is_measured_not_believed(decoded_packets) -> None:  # type: ignore[no-untyped-def]
    pcm = (C.tone(2.0) * 32767).astype("<i2").tobytes()
    data = C.wav_header(rate=16000, channels=1, data_bytes=0xFFFFFFFF, riff_bytes=0xFFFFFFFF) + pcm
    assert len(decode_bytes(data, max_samples=TEN_MINUTES, refuse_longer=True).samples) == 32000


async def test_the_pool_refuses_hours_of_audio_when_asked(long_recordings, decoder_pool: DecoderPool) -> None:  # type: ignore[no-untyped-def]
    data = long_recordings["opus_2h"].read_bytes()
    with pytest.raises(errors.AudioTooLong):
        await decoder_pool.decode(data, max_seconds=600, refuse_longer=True)
    clip = await decoder_pool.decode(data, max_seconds=30)  # chat: the first 30 s, as before
    assert clip.truncated and len(clip.samples) == 480_000


async def test_a_chat_clip_never_queues_behind_whole_recordings(test_pythonpath) -> None:
    pool = DecoderPool(2, timeout_s=15.0, target="tests.audio.workers:hang_on_magic")
    await pool.start()
    try:
        hung = [
            asyncio.ensure_future(pool.decode(b"HANG" + bytes(100), max_seconds=600, refuse_longer=True))
            for _ in range(2)
        ]  # two transcriptions whose decoding never ends
        for _ in range(10):  # let both run up to where they wait: on a worker, or for their turn at one
            await asyncio.sleep(0)
        pcm = np.repeat(C.tone(1.0) * 32767, 2).astype("<i2").tobytes()  # stereo: a worker's job, not the fast path
        clip = await pool.decode(C.wav_header(rate=16000, channels=2, data_bytes=len(pcm)) + pcm)  # a chat clip
        assert clip.seconds == 1.0
        assert not any(h.done() for h in hung)  # served while both recordings were still being decoded
        for h in hung:
            with pytest.raises(errors.DecodeTimeout):
                await h
    finally:
        await pool.close()
