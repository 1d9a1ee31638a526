"""Plain PCM WAV decoded in the server process, without FFmpeg: the files whose samples are already the model's.

Most clients send 16 kHz mono 16-bit PCM WAV, whose samples need no decoding at all: FFmpeg's path (a worker
process, a pipe round trip, PyAV's demuxer, decoder and resampler) turns each int16 into float32 divided by 32768,
and that is all. `decode_plain_wav` gives the same AudioClip bit for bit (samples, duration_s, truncated, the
first `max_samples` used, container and codec names, and the same errors) for exactly those files, and None for
anything else, which then goes to the decoder workers as before.

What it takes (anything else, or any doubt, is None): "RIFF" ... "WAVE"; before "data" exactly one "fmt " chunk,
and "JUNK" or well-formed "LIST"/"INFO" chunks (FFmpeg reads their tags, and PyAV refuses one that is not UTF-8),
each wholly inside the buffer; "fmt " is PCM (1), or WAVE_FORMAT_EXTENSIBLE whose subformat is PCM with 16 valid
bits and a mono channel mask, with 1 channel, 16000 Hz, 16 bits, 2-byte blocks and 32000 bytes/s; the "data" size
is neither 0 nor 0xFFFFFFFF (FFmpeg reads those to the end of the file) and lies wholly inside the buffer; after it
only such "JUNK" / "LIST" chunks; and no IEC 61937 sync code in its first 64 KiB (FFmpeg would take the data for
S/PDIF-wrapped AC-3 or DTS). Other rates, channel counts and sample formats are left to FFmpeg.

Parsing is a few struct reads at offsets checked against the buffer's length (no size field is ever allocated
from or trusted past the buffer), over at most 16 chunks and 64 tags of at most 4 KiB (a flood of chunks goes to
FFmpeg); the payload is one numpy conversion of at most `max_samples` samples, viewed in place.
"""

from __future__ import annotations

import struct

import numpy as np

from ting import errors
from ting.types import MIN_SAMPLES, SAMPLE_RATE, AudioClip

CONTAINER, CODEC = "wav", "pcm_s16le"  # the names FFmpeg's path reports for these files

_RIFF = struct.Struct("<4sI4s")
_CHUNK = struct.Struct("<4sI")
_FMT = struct.Struct("<HHIIHH")  # format tag, channels, rate, bytes/s, block align, bits per sample
_EXTENSIBLE = struct.Struct("<HHI16s")  # cbSize, valid bits, channel mask, subformat GUID
_PCM, _WAVE_FORMAT_EXTENSIBLE = 1, 0xFFFE
_PCM_SUBFORMAT = bytes.fromhex("0100000000001000800000aa00389b71")  # KSDATAFORMAT_SUBTYPE_PCM
_MONO_MASKS = frozenset({0, 0x1, 0x4})  # none, front left, front centre
_STREAMING_SIZES = frozenset({0, 0xFFFFFFFF})  # "read to the end of the file" for FFmpeg
_MAX_CHUNKS = 16  # chunks before and after the data: more (a flood of empty chunks) is left to FFmpeg
_MAX_TAGS, _MAX_TAG_BYTES = 64, 4096  # LIST INFO tags, and the bytes of each, read here
_SPDIF_SYNC = b"\x72\xf8\x1f\x4e"  # IEC 61937 Pa, Pb as FFmpeg's wav demuxer looks for them
_SPDIF_PROBE_BYTES = 1 << 16  # how much of the data FFmpeg's wav demuxer probes for S/PDIF
_BYTES_PER_SAMPLE = 2
_SCALE = np.float32(1.0 / 32768)  # what swresample multiplies an s16 sample by to make it float (exact)


def too_long(max_samples: int) -> errors.AudioTooLong:
    return errors.AudioTooLong(f"The input audio is longer than {max_samples / SAMPLE_RATE:g}s.")


def plain_pcm(data: bytes) -> memoryview | None:
    """The sample bytes of a WAV this module takes (see the module's docstring), or None."""
    if len(data) < _RIFF.size:
        return None
    riff, _, wave = _RIFF.unpack_from(data, 0)
    if riff != b"RIFF" or wave != b"WAVE":
        return None
    found = _find_data(data)
    if found is None:
        return None
    start, size = found
    end = start + size
    if not _only_chunks(data, end + (size & 1)):
        return None
    if data.find(_SPDIF_SYNC, start, start + _SPDIF_PROBE_BYTES + len(_SPDIF_SYNC)) >= 0:
        return None
    return memoryview(data)[start:end]


def decode_plain_wav(data: bytes, *, max_samples: int, refuse_longer: bool = False) -> AudioClip | None:
    """The clip FFmpeg's path (decode.decode_bytes) gives for `data`, if this module takes it; else None.

    Raises the same AudioError FFmpeg's path raises for it (too short, too long with `refuse_longer`)."""
    if max_samples < MIN_SAMPLES:
        return None
    payload = plain_pcm(data)
    if payload is None:
        return None
    return clip_of(payload, max_samples=max_samples, refuse_longer=refuse_longer)


def clip_of(payload: memoryview, *, max_samples: int, refuse_longer: bool) -> AudioClip:
    """Samples from `plain_pcm`'s bytes, with FFmpeg's path's rules: a trailing odd byte is no sample; decoding
    that reaches `max_samples` is truncated there (reported with the header's duration); too short is refused."""
    total = len(payload) // _BYTES_PER_SAMPLE
    truncated = total >= max_samples  # FFmpeg's path stops once its output holds max_samples
    if truncated and refuse_longer:
        raise too_long(max_samples)
    if total == 0:
        raise errors.InvalidAudio()
    if total < MIN_SAMPLES:
        raise errors.AudioTooShort()
    used = min(total, max_samples)
    pcm = np.frombuffer(payload, dtype="<i2", count=used)
    samples = pcm.astype(np.float32)
    samples *= _SCALE
    samples.flags.writeable = False  # as the worker's samples (a view of the pipe's bytes): clips are shared
    return AudioClip(
        samples=samples,
        duration_s=total / SAMPLE_RATE,  # the header's length when truncated: data bytes / block align
        truncated=truncated,
        container=CONTAINER,
        codec=CODEC,
    )


def _find_data(data: bytes) -> tuple[int, int] | None:
    """(offset, size) of the data chunk after exactly one acceptable fmt chunk, all inside `data`; else None."""
    offset, fmt_seen = _RIFF.size, False
    for _ in range(_MAX_CHUNKS):
        if offset + _CHUNK.size > len(data):
            return None
        chunk_id, size = _CHUNK.unpack_from(data, offset)
        body = offset + _CHUNK.size
        if chunk_id == b"data":
            if not fmt_seen or size in _STREAMING_SIZES or body + size > len(data):
                return None
            return body, size
        if body + size > len(data):
            return None
        if chunk_id == b"fmt ":
            if fmt_seen or not _plain_format(data[body : body + size]):
                return None
            fmt_seen = True
        elif not _skippable(chunk_id, data, body, size):
            return None
        offset = body + size + (size & 1)
    return None


def _plain_format(fmt: bytes) -> bool:
    """A fmt chunk of 16 kHz mono 16-bit PCM, plain or extensible, exactly as a writer of it writes it."""
    if len(fmt) < _FMT.size:
        return False
    tag, channels, rate, byte_rate, block_align, bits = _FMT.unpack_from(fmt, 0)
    if (channels, rate, byte_rate, block_align, bits) != (1, SAMPLE_RATE, 2 * SAMPLE_RATE, 2, 16):
        return False
    if tag == _PCM:
        return len(fmt) == _FMT.size or (len(fmt) == _FMT.size + 2 and fmt[_FMT.size :] == b"\0\0")
    if tag == _WAVE_FORMAT_EXTENSIBLE and len(fmt) == _FMT.size + _EXTENSIBLE.size:
        extra, valid_bits, mask, subformat = _EXTENSIBLE.unpack_from(fmt, _FMT.size)
        return (
            extra == _EXTENSIBLE.size - 2 and valid_bits == 16 and mask in _MONO_MASKS and subformat == _PCM_SUBFORMAT
        )
    return False


def _only_chunks(data: bytes, offset: int) -> bool:
    """Whether `data` from `offset` on is nothing, or whole chunks FFmpeg skips alike (a last pad byte may be
    missing)."""
    for _ in range(_MAX_CHUNKS):
        if offset >= len(data):
            return True
        if offset + _CHUNK.size > len(data):
            return False
        chunk_id, size = _CHUNK.unpack_from(data, offset)
        body = offset + _CHUNK.size
        if body + size > len(data) or not _skippable(chunk_id, data, body, size):
            return False
        offset = body + size + (size & 1)
    return False


def _skippable(chunk_id: bytes, data: bytes, body: int, size: int) -> bool:
    """A chunk that changes nothing FFmpeg's path gives: JUNK, or a LIST INFO whose tags PyAV reads without error
    (FFmpeg refuses a LIST under 4 bytes or with a tag past its end; PyAV, a tag that is not UTF-8)."""
    if chunk_id == b"JUNK":
        return True
    if chunk_id != b"LIST" or size < 4 or data[body : body + 4] != b"INFO":
        return False
    offset, end = body + 4, body + size
    for _ in range(_MAX_TAGS):
        if offset >= end:
            return offset <= end + 1  # the last tag's pad byte may lie past the list
        if offset + _CHUNK.size > end:
            return False
        key, length = _CHUNK.unpack_from(data, offset)
        value = offset + _CHUNK.size
        if not all(0x21 <= c <= 0x7E for c in key) or length > _MAX_TAG_BYTES or value + length > end:
            return False
        nul = data.find(b"\0", value, value + length)
        try:
            str(memoryview(data)[value : nul if nul >= 0 else value + length], "utf-8")
        except UnicodeDecodeError:
            return False
        offset = value + length + (length & 1)
    return False
