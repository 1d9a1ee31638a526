"""The audio test corpus, made at test time.

Speech comes from espeak-ng (English and Chinese); FFmpeg's command line, sox, PyAV's encoders and the
VisualOn AMR-WB encoder (through ctypes; no FFmpeg or sox build here can encode AMR-WB) turn it into every
format the hosted API accepts and a few more. Nothing is downloaded and nothing is committed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import struct
import subprocess
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

SPEECH = {
    "en": ("en", "Hello, and welcome to Ting. This clip tests the audio decoder with English speech."),
    "zh": ("cmn", "你好，欢迎使用听。这段音频用来测试中文语音的解码。"),
}


@dataclass(frozen=True)
class Sample:
    name: str
    path: Path
    container: str  # what the sniffer must say
    codec: str  # what the decoder must report
    duration_s: float  # the true duration of the speech inside
    tolerance_s: float  # how far the decoded length may be from it (codec framing, priming)


def have(*programs: str) -> bool:
    return all(shutil.which(p) for p in programs)


def speak(lang: str, path: Path) -> Path:
    voice, text = SPEECH[lang]
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)
    return path


def wav_duration(path: Path) -> float:
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


def raw_mp3_frames(src: Path, dst: Path) -> Path:
    """`src` as bare 8 kb/s MP3 frames (no Xing header, no ID3 tag): bytes that can be repeated into a longer,
    still valid, stream whose length only the frames tell."""
    return ffmpeg(
        src,
        dst,
        "-c:a",
        "libmp3lame",
        "-b:a",
        "8k",
        "-ar",
        "8000",
        "-write_xing",
        "0",
        "-id3v2_version",
        "0",
        "-f",
        "mp3",
    )


def ffmpeg(src: Path, dst: Path, *args: str) -> Path:
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(src), *args, str(dst)],
        check=True,
        capture_output=True,
    )
    return dst


def pyav_encode(src: Path, dst: Path, fmt: str, codec: str, rate: int, bit_rate: int | None = None) -> Path:
    """Encode with PyAV's bundled FFmpeg (the Debian ffmpeg CLI has no AMR-NB encoder)."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        if bit_rate:
            stream.bit_rate = bit_rate
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        for frame in inp.decode(audio=0):
            for f in resampler.resample(frame):
                out.mux(stream.encode(f))
        for f in resampler.resample(None):
            out.mux(stream.encode(f))
        out.mux(stream.encode(None))
    return dst


def amr_wb_encode(src: Path, dst: Path, mode: int = 8) -> Path:
    """AMR-WB (RFC 4867 storage format) through libvo-amrwbenc's E_IF_* API, 320 samples per 20 ms frame."""
    lib = ctypes.CDLL(ctypes.util.find_library("vo-amrwbenc") or "libvo-amrwbenc.so.0")
    lib.E_IF_init.restype = ctypes.c_void_p
    lib.E_IF_encode.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_short),
        ctypes.POINTER(ctypes.c_ubyte),
        ctypes.c_int,
    ]
    lib.E_IF_exit.argtypes = [ctypes.c_void_p]
    pcm = read_pcm16k(src)
    pcm = np.concatenate([pcm, np.zeros(-len(pcm) % 320, dtype=np.int16)])
    state = lib.E_IF_init()
    out = bytearray(b"#!AMR-WB\n")
    buf = (ctypes.c_ubyte * 64)()
    for i in range(0, len(pcm), 320):
        frame = np.ascontiguousarray(pcm[i : i + 320])
        n = lib.E_IF_encode(state, mode, frame.ctypes.data_as(ctypes.POINTER(ctypes.c_short)), buf, 0)
        out += bytes(buf[:n])
    lib.E_IF_exit(state)
    dst.write_bytes(bytes(out))
    return dst


def read_pcm16k(src: Path) -> np.ndarray:
    raw = subprocess.run(
        [
            "ffmpeg",
            "-hide_banner",
            "-loglevel",
            "error",
            "-i",
            str(src),
            "-ac",
            "1",
            "-ar",
            "16000",
            "-f",
            "s16le",
            "-",
        ],
        check=True,
        capture_output=True,
    ).stdout
    return np.frombuffer(raw, dtype=np.int16)


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000, channels: int = 1) -> Path:
    """16-bit PCM WAV from float samples in [-1, 1] (shape (n,) or (n, channels))."""
    data = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.tobytes())
    return path


def tone(seconds: float, rate: int = 16000, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def wav_header(*, rate: int, channels: int, bits: int = 16, data_bytes: int, riff_bytes: int | None = None) -> bytes:
    """A hand-made WAV header, for lying about rates, channels and lengths."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, bits)
    riff = riff_bytes if riff_bytes is not None else 36 + data_bytes
    return (
        b"RIFF"
        + struct.pack("<I", riff & 0xFFFFFFFF)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", data_bytes & 0xFFFFFFFF)
    )


Builder = Callable[[Path, Path], Path]

# name -> (builder from a speech WAV, container, codec, tolerance in seconds)
FORMATS: dict[str, tuple[Builder, str, str, float]] = {
    "wav_pcm_s16": (lambda s, d: ffmpeg(s, d, "-c:a", "pcm_s16le", "-f", "wav"), "wav", "pcm_s16le", 0.005),
    "wav_pcm_u8": (lambda s, d: ffmpeg(s, d, "-c:a", "pcm_u8", "-f", "wav"), "wav", "pcm_u8", 0.005),
    "wav_pcm_s24": (lambda s, d: ffmpeg(s, d, "-c:a", "pcm_s24le", "-f", "wav"), "wav", "pcm_s24le", 0.005),
    "wav_pcm_s32": (lambda s, d: ffmpeg(s, d, "-c:a", "pcm_s32le", "-f", "wav"), "wav", "pcm_s32le", 0.005),
    "wav_pcm_f32": (lambda s, d: ffmpeg(s, d, "-c:a", "pcm_f32le", "-f", "wav"), "wav", "pcm_f32le", 0.005),
    "wav_stereo_44k": (
        lambda s, d: ffmpeg(s, d, "-ac", "2", "-ar", "44100", "-c:a", "pcm_s16le", "-f", "wav"),
        "wav",
        "pcm_s16le",
        0.005,
    ),
    "wav_stereo_48k_f32": (
        lambda s, d: ffmpeg(s, d, "-ac", "2", "-ar", "48000", "-c:a", "pcm_f32le", "-f", "wav"),
        "wav",
        "pcm_f32le",
        0.005,
    ),
    "wav_8k": (lambda s, d: ffmpeg(s, d, "-ar", "8000", "-c:a", "pcm_s16le", "-f", "wav"), "wav", "pcm_s16le", 0.005),
    "wav_mulaw": (
        lambda s, d: ffmpeg(s, d, "-ar", "8000", "-c:a", "pcm_mulaw", "-f", "wav"),
        "wav",
        "pcm_mulaw",
        0.005,
    ),
    "wav_alaw": (lambda s, d: ffmpeg(s, d, "-ar", "8000", "-c:a", "pcm_alaw", "-f", "wav"), "wav", "pcm_alaw", 0.005),
    "wav_gsm_ms": (
        lambda s, d: ffmpeg(s, d, "-ar", "8000", "-ac", "1", "-c:a", "libgsm_ms", "-f", "wav"),
        "wav",
        "gsm_ms",
        0.045,
    ),  # 40 ms GSM blocks
    "amr_nb": (lambda s, d: pyav_encode(s, d, "amr", "libopencore_amrnb", 8000, 12200), "amr", "amr_nb", 0.025),
    "amr_wb": (lambda s, d: amr_wb_encode(s, d), "amr", "amr_wb", 0.025),
    "3gp_amr_nb": (lambda s, d: pyav_encode(s, d, "3gp", "libopencore_amrnb", 8000, 12200), "mov", "amr_nb", 0.025),
    "3gpp_aac": (lambda s, d: ffmpeg(s, d, "-c:a", "aac", "-f", "3gp"), "mov", "aac", 0.025),
    "aac_adts": (
        lambda s, d: ffmpeg(s, d, "-c:a", "aac", "-f", "adts"),
        "aac",
        "aac",
        0.090,
    ),  # ADTS records neither the encoder priming nor the end padding
    "m4a_aac": (lambda s, d: ffmpeg(s, d, "-c:a", "aac", "-f", "ipod"), "mov", "aac", 0.025),
    "mp3_cbr": (lambda s, d: ffmpeg(s, d, "-c:a", "libmp3lame", "-b:a", "64k", "-f", "mp3"), "mp3", "mp3", 0.025),
    "mp3_vbr_id3": (
        lambda s, d: ffmpeg(
            s, d, "-c:a", "libmp3lame", "-q:a", "5", "-metadata", "title=Ting test", "-id3v2_version", "4", "-f", "mp3"
        ),
        "mp3",
        "mp3",
        0.025,
    ),
    "flac": (lambda s, d: ffmpeg(s, d, "-c:a", "flac", "-f", "flac"), "flac", "flac", 0.005),
    "ogg_vorbis": (lambda s, d: ffmpeg(s, d, "-c:a", "libvorbis", "-f", "ogg"), "ogg", "vorbis", 0.025),
    "ogg_opus": (lambda s, d: ffmpeg(s, d, "-c:a", "libopus", "-f", "ogg"), "ogg", "opus", 0.025),
    "webm_opus": (lambda s, d: ffmpeg(s, d, "-c:a", "libopus", "-f", "webm"), "matroska", "opus", 0.025),
    "mp4_video": (lambda s, d: _video(s, d), "mov", "aac", 0.025),
}


def _video(src: Path, dst: Path) -> Path:
    """An MP4 with an H.264 video track and the speech as its AAC audio track."""
    subprocess.run(
        [
            "ffmpeg",
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=64x64:rate=10",
            "-i",
            str(src),
            "-shortest",
            "-map",
            "0:v",
            "-map",
            "1:a",
            "-c:v",
            "libx264",
            "-c:a",
            "aac",
            "-f",
            "mp4",
            str(dst),
        ],
        check=True,
        capture_output=True,
    )
    return dst


def build(directory: Path) -> dict[str, Sample]:
    """Build the whole corpus under `directory`: every format, in English and Chinese."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus: dict[str, Sample] = {}
    for lang in SPEECH:
        source = speak(lang, directory / f"speech_{lang}.wav")
        duration = wav_duration(source)
        for fmt, (builder, container, codec, tolerance) in FORMATS.items():
            name = f"{fmt}_{lang}"
            path = builder(source, directory / name)
            corpus[name] = Sample(name, path, container, codec, duration, tolerance)
    return corpus


def long_recordings(directory: Path) -> dict[str, Path]:
    """Hours of audio in a few MB, made in a second or two: 10 s of tone encoded once, its packets repeated.

    opus_2h: Ogg Opus, 2 h (its last granule position declares the length); mp3_2h: raw CBR MP3 frames, 2 h (a
    length estimated from the bit rate); webm_11min: WebM/Opus written to a pipe (no declared length at all).
    """
    directory.mkdir(parents=True, exist_ok=True)
    ten = write_wav(directory / "ten.wav", tone(10.0))
    opus = ffmpeg(ten, directory / "ten.opus", "-c:a", "libopus", "-b:a", "6k")
    mp3 = raw_mp3_frames(ten, directory / "ten.mp3")
    out = {"opus_2h": directory / "2h.opus", "mp3_2h": directory / "2h.mp3", "webm_11min": directory / "11min.webm"}
    loop = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-stream_loop"]
    subprocess.run([*loop, "719", "-i", str(opus), "-c", "copy", str(out["opus_2h"])], check=True, capture_output=True)
    with out["webm_11min"].open("wb") as piped:
        subprocess.run(
            [*loop, "65", "-i", str(opus), "-c", "copy", "-f", "webm", "pipe:1"],
            check=True,
            stdout=piped,
            stderr=subprocess.DEVNULL,
        )
    out["mp3_2h"].write_bytes(mp3.read_bytes() * 720)
    return out
