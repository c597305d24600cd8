"""Token ids -> text deltas while a request streams, with stop strings cut out of the text.

Decoding a growing id list one token at a time is wrong for byte-level BPE: a character may span
tokens, and half of it decodes to U+FFFD. So, as in vLLM/TGI, each step decodes a short window
(the previous step's tokens plus the new ones) and only keeps the new text once it no longer ends in
U+FFFD. Text that could still grow into a stop string is held back from the stream until it can't.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str], stop: list[str] | None = None):
        self._decode = decode
        self.stop = list(stop or [])
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far, cut before the first stop string
        self.offsets: list[int] = []  # per token: len(text) when it arrived (completions' text_offset)
        self.stopped = False  # a stop string was found; later tokens are ignored
        self._prefix = 0  # ids[_prefix:_read] is the window whose text is already in self.text
        self._read = 0
        self._emitted = 0  # chars of self.text already handed out by take()

    def add(self, new_ids: list[int]) -> None:
        for tok in new_ids:
            if self.stopped:
                return
            self.offsets.append(len(self.text))
            self.ids.append(tok)
            self._advance(final=False)

    def finish(self) -> None:
        """The request ended: decode what is left even if it ends in half a character."""
        if not self.stopped:
            self._advance(final=True)

    def take(self, final: bool = False) -> str:
        """Text not handed out yet, less what may be the start of a stop string (unless final)."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._stop_prefix_len()
        delta = self.text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return delta

    def _advance(self, final: bool) -> None:
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith(REPLACEMENT)):
            self._append(new_text[len(prefix_text):])
            self._prefix, self._read = self._read, len(self.ids)

    def _append(self, delta: str) -> None:
        start = max(0, len(self.text) - self._longest_stop + 1)  # a stop may straddle the old end
        self.text += delta
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
