"""Streaming detokenisation: token ids in, text deltas out.

Byte-level BPE tokens can end in the middle of a UTF-8 character (most Chinese characters are three
bytes). A delta is released only once the text decoded so far no longer ends in an incomplete character,
so a stream never carries half a character. Stop strings: text that might be the start of a stop string is
held back until it is known not to be; once one appears, the text before it is the last thing released.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"
MAX_PENDING_TOKENS = 16  # give up waiting for a character to complete after this many tokens


class IncrementalDecoder:
    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] decode to text already released
        self._read = 0
        self._held = ""  # released by the tokenizer, held back as a possible stop-string start
        self.text = ""  # everything released so far
        self.stopped = False  # a stop string was found

    def push(self, token_id: int) -> str:
        """Add one token; return the text that can be released now (maybe empty)."""
        self._ids.append(token_id)
        if self.stopped:
            return ""
        return self._release(self._new_text(final=False), final=False)

    def flush(self) -> str:
        """The end of the sequence: release everything still held."""
        if self.stopped:
            return ""
        return self._release(self._new_text(final=True), final=True)

    def _new_text(self, *, final: bool) -> str:
        done = self._decode(self._ids[self._prefix:self._read])
        whole = self._decode(self._ids[self._prefix:])
        complete = not whole.endswith(REPLACEMENT) or len(self._ids) - self._read >= MAX_PENDING_TOKENS
        if len(whole) <= len(done) or not (complete or final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return whole[len(done):]

    def _release(self, delta: str, *, final: bool) -> str:
        buffer = self._held + delta
        cut = min((i for i in (buffer.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._held = buffer[:cut], ""
        elif final:
            out, self._held = buffer, ""
        else:
            keep = _longest_stop_prefix(buffer, self._stop)
            out, self._held = buffer[:len(buffer) - keep], buffer[len(buffer) - keep:]
        self.text += out
        return out


def _longest_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
