"""Text-level generation: token stream → text pieces, with stop strings."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from mlx_llama.tokenizer import Tokenizer


class StopStringFilter:
    """Passes text through until a stop string appears; holds back possible prefixes of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        text = self._held + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return text[: min(hits)]
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold]

    def flush(self) -> str:
        text, self._held = self._held, ""
        return text


class TextAssembler:
    """One answer's text, pushed token by token: detokenizes, ends at a stop token
    (not printed) or a stop string (cut before it); `done` says it ended."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = ()) -> None:
        self._detok = tokenizer.detokenizer()
        self._stops = StopStringFilter(stop_strings)
        self._stop_ids = tokenizer.stop_ids
        self.done = False

    def add(self, token: int) -> str:
        """The text this token completes."""
        if self.done:
            return ""
        if token in self._stop_ids:
            return self.finish()
        piece = self._stops.feed(self._detok.add(token))
        self.done = self._stops.stopped
        return piece

    def finish(self) -> str:
        """Whatever text is still held back (the tokens ran out)."""
        if self.done:
            return ""
        self.done = True
        tail = self._stops.feed(self._detok.flush())
        return tail + ("" if self._stops.stopped else self._stops.flush())


def stream_text(
    tokens: Iterator[int], tokenizer: Tokenizer, stop_strings: Sequence[str] = ()
) -> Iterator[str]:
    """Text pieces of a token stream; closes the stream at a stop string.

    Stop tokens end the text silently (they are not printed).
    """
    text = TextAssembler(tokenizer, stop_strings)
    try:
        for tok in tokens:
            piece = text.add(tok)
            if piece:
                yield piece
            if text.done:
                return
        tail = text.finish()
        if tail:
            yield tail
    finally:
        close: Any = getattr(tokens, "close", None)
        if close:
            close()
