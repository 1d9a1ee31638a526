"""Streaming detokenisation: token ids in, text deltas out.

Byte-level BPE tokens can end in the middle of a UTF-8 character (most Chinese characters are three
bytes). A delta is released only once the text decoded so far no longer ends in an incomplete character,
so a stream never carries half a character. Stop strings: text that might be the start of a stop string is
held back until it is known not to be; once one appears, the text before it is the last thing released.

Stop strings are matched by one automaton built when the request starts (Aho-Corasick): each released
character is one step, whatever the number or length of the stop strings, so a long stop list costs the
engine thread nothing per token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"
MAX_PENDING_TOKENS = 16  # give up waiting for a character to complete after this many tokens


class StopMatcher:
    """Aho-Corasick over the stop strings: feed characters one at a time.

    The state is the longest suffix of the text fed so far that is a prefix of some stop string; its length is
    how much text must be held back, and a state that ends a stop string is a match.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._next: list[dict[str, int]] = [{}]  # the trie's edges
        self._depth = [0]  # length of each state's string
        self._match = [0]  # length of the longest stop string ending each state's string (0: none)
        for stop in stops:
            self._insert(stop)
        self._fail = [0] * len(self._next)
        self._link()
        self.state = 0

    def _insert(self, stop: str) -> None:
        node = 0
        for ch in stop:
            if ch not in self._next[node]:
                self._next.append({})
                self._depth.append(self._depth[node] + 1)
                self._match.append(0)
                self._next[node][ch] = len(self._next) - 1
            node = self._next[node][ch]
        self._match[node] = len(stop)

    def _link(self) -> None:
        queue = list(self._next[0].values())
        for node in queue:  # breadth first: a node's failure link is shallower, so already known
            for ch, child in self._next[node].items():
                fail = self._fail[node]
                while fail and ch not in self._next[fail]:
                    fail = self._fail[fail]
                self._fail[child] = self._next[fail].get(ch, 0)
                self._match[child] = self._match[child] or self._match[self._fail[child]]
                queue.append(child)

    def feed(self, ch: str) -> int:
        """Step over one character; the length of the stop string that ends here (0: none)."""
        node = self.state
        while node and ch not in self._next[node]:
            node = self._fail[node]
        self.state = self._next[node].get(ch, 0)
        return self._match[self.state]

    @property
    def held(self) -> int:
        """Characters at the end of the text that may still begin a stop string."""
        return self._depth[self.state]


class IncrementalDecoder:
    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        stops = [s for s in stop if s]
        self._stop = StopMatcher(stops) if stops else None
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
        done = self._decode(self._ids[self._prefix : self._read])
        whole = self._decode(self._ids[self._prefix :])
        complete = not whole.endswith(REPLACEMENT) or len(self._ids) - self._read >= MAX_PENDING_TOKENS
        if len(whole) <= len(done) or not (complete or final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return whole[len(done) :]

    def _release(self, delta: str, *, final: bool) -> str:
        buffer = self._held + delta
        cut = self._find_stop(delta, len(self._held))
        if cut >= 0:
            self.stopped = True
            out, self._held = buffer[:cut], ""
        elif final or self._stop is None:
            out, self._held = buffer, ""
        else:
            keep = self._stop.held
            out, self._held = buffer[: len(buffer) - keep], buffer[len(buffer) - keep :]
        self.text += out
        return out

    def _find_stop(self, delta: str, offset: int) -> int:
        """Where in held + delta the first stop string to end begins (-1: none); only delta's characters are new."""
        if self._stop is None:
            return -1
        for i, ch in enumerate(delta):
            length = self._stop.feed(ch)
            if length:
                return offset + i + 1 - length
        return -1
