"""Incremental ids -> text for one request: UTF-8 safe, stop strings matched across token boundaries."""
from __future__ import annotations

import codecs

from model.tokenizer import TextTokenizer
from service.engine.request import SamplingParams


class IncrementalDetokenizer:
    """Turns generated token ids into text pieces that are safe to stream.

    A piece never ends inside a UTF-8 character and never contains a stop string or a piece of text
    that may still turn out to start one. The pieces join to `text`; without stop strings, a run that
    finishes normally gives exactly `tokenizer.decode(ids, skip_special_tokens)`, because both decode
    the concatenated token bytes (special tokens included as their text, or skipped).
    """

    def __init__(self, tokenizer: TextTokenizer, params: SamplingParams):
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.include_stop_str = params.include_stop_str_in_output
        self.stops = [s for s in params.stop if s]
        self.max_stop_len = max(map(len, self.stops), default=0)
        self.stop_prefixes = {s[:k] for s in self.stops for k in range(1, len(s))}
        self.special_ids = set(tokenizer.special_ids.values())
        # errors="replace" only bites on bytes that can never become valid UTF-8; an incomplete
        # trailing sequence is held inside the decoder until more bytes come (or finish()).
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""  # decoded text held back because it may be the start of a stop string
        self.stop_matched: str | None = None
        self.is_done = False
        self._text = ""
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far (joined lazily so each token costs O(new text))."""
        if self._pieces:
            self._text = "".join([self._text, *self._pieces])
            self._pieces.clear()
        return self._text

    def add(self, token_id: int) -> str:
        """Append one generated token; return the new text that is now safe to emit ("" if none)."""
        if self.is_done:
            return ""
        if self.skip_special_tokens and token_id in self.special_ids:
            return ""
        return self._emit(self._scan(self.utf8.decode(self.tokenizer.token_bytes(token_id))))

    def finish(self) -> str:
        """The request ended for another reason: release everything held back and return it."""
        if self.is_done:
            return ""
        # An incomplete trailing UTF-8 sequence can no longer complete: decode it with errors="replace".
        piece = self._scan(self.utf8.decode(b"", final=True))
        piece, self.held = piece + self.held, ""
        self.is_done = True
        return self._emit(piece)

    def _emit(self, piece: str) -> str:
        if piece:
            self._pieces.append(piece)
        return piece

    def _scan(self, new: str) -> str:
        """Add newly decoded text; return the part safe to emit, keeping a possible stop prefix held."""
        if not self.stops:
            return new
        if not new:
            return ""
        # A stop string that is not yet complete can only begin inside `held` (the longest suffix that
        # is a prefix of a stop string), so `held + new` is the whole window to search.
        window = self.held + new
        match = self._first_stop(window)
        if match is not None:
            stop, start = match
            self.stop_matched, self.held, self.is_done = stop, "", True
            return window[:start + len(stop)] if self.include_stop_str else window[:start]
        num_held = self._num_stop_prefix_chars(window)
        self.held = window[len(window) - num_held:]
        return window[:len(window) - num_held]

    def _first_stop(self, window: str) -> tuple[str, int] | None:
        """The stop string that completes first in `window` (ties: the one starting earlier), so the
        result does not depend on how the text was split into tokens."""
        best = None
        for stop in self.stops:
            start = window.find(stop)
            if start >= 0:
                key = (start + len(stop), start)
                if best is None or key < best[0]:
                    best = (key, stop, start)
        return None if best is None else (best[1], best[2])

    def _num_stop_prefix_chars(self, window: str) -> int:
        """Length of the longest suffix of `window` that is a proper prefix of some stop string."""
        for start in range(max(0, len(window) - self.max_stop_len + 1), len(window)):
            if window[start:] in self.stop_prefixes:
                return len(window) - start
        return 0
