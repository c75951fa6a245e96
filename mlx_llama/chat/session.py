"""A multi-turn conversation that keeps its KV cache between turns (no UI here).

State: `messages` (the conversation, system prompt first when there is one),
`cache` (one KV cache per layer) and `cached_ids` (the token id at every
position the cache has seen, so `len(cached_ids) == cache[0].offset`).

Exactness.  Each turn renders the whole conversation with the chat template and
tokenizes it (`full`).  The cache is kept only up to the longest prefix that
`cached_ids` shares with `full`; the rest of the cache is rolled back and the
rest of `full` is prefilled.  Usually the previous answer's ids, ending in
`<|eot_id|>`, re-tokenize to themselves, so only the new user message and the
assistant header are fed.  When they do not (the template trims content,
generation was cut short, or the generated ids are not the canonical
tokenization of their text), the differing tail is rolled back and re-fed.
Either way a growing cache then holds exactly what a from-scratch run on the
rendered conversation would hold.

A rotating cache (`max_kv_size`) cannot roll back once it has evicted (the
positions the rolled-back tail displaced are gone).  Then the turn continues
from the tokens the model actually produced: `<|eot_id|>` if the answer did not
end with it, then the tokenized template text that follows the previous
messages.  The system prompt is the rotating cache's `keep` prefix.

Without `max_kv_size`, when the conversation plus room for an answer would pass
the model's context, the oldest turns are dropped (the system prompt stays) and
the cache is rolled back to the shared prefix and refilled from the kept ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from mlx_llama.generation import prompt_cache
from mlx_llama.errors import MlxLlamaError
from mlx_llama.generation.loop import GenerationStats, generate_tokens
from mlx_llama.generation.sampler import Sampler, SamplingParams
from mlx_llama.generation.text import stream_text
from mlx_llama.tokenizer import Message

ROLES = ("system", "user", "assistant")


def validate_messages(data: Any, source: str = "conversation") -> list[Message]:
    if isinstance(data, dict):
        data = data.get("messages")
    if not isinstance(data, list):
        raise MlxLlamaError(f"{source}: expected a list of messages or {{\"messages\": [...]}}")
    out = []
    for i, m in enumerate(data):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise MlxLlamaError(f"{source}: message {i} needs a role ({', '.join(ROLES)}) and string content")
        if m["role"] == "system" and i != 0:
            raise MlxLlamaError(f"{source}: only the first message may be a system prompt")
        out.append({"role": m["role"], "content": m["content"]})
    return out


class ChatSession:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        system: str | None = None,
        sampling: SamplingParams = SamplingParams(),
        max_tokens: int = 256,
        max_kv_size: int | None = None,
        keep: int = 4,
        prefill_step_size: int = 512,
        notify: Callable[[str], None] = lambda msg: None,
    ) -> None:
        if tokenizer is None:
            raise MlxLlamaError("chat needs a model directory with a tokenizer.json")
        if max_tokens < 1:
            raise MlxLlamaError("max tokens must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.sampler = Sampler(sampling)
        self.max_tokens = max_tokens
        self.max_kv_size = max_kv_size
        self.default_keep = keep
        self.prefill_step_size = prefill_step_size
        self.notify = notify
        self.messages: list[Message] = [{"role": "system", "content": system}] if system else []
        self.last_stats: GenerationStats | None = None
        self._unstarted: Message | None = None  # the question of an answer not yet started
        self.first_prompt_len: int | None = None  # cache positions of the first turn's prompt
        eot = tokenizer.encode("<|eot_id|>")
        self._eot = eot[0] if len(eot) == 1 and eot[0] in tokenizer.stop_ids else None
        self._new_cache(self._keep_for(self.system))

    # ---- state --------------------------------------------------------------------

    @property
    def system(self) -> str | None:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    @property
    def rotating(self) -> bool:
        return self.cache[0].max_size is not None

    @property
    def cache_tokens(self) -> int:
        """Tokens the cache holds now (bounded by max_kv_size for a rotating cache)."""
        return self.cache[0].size

    @property
    def context_limit(self) -> int:
        return self.model.config.max_position_embeddings

    def _render_ids(self, messages: Sequence[Message], generation_prompt: bool = True) -> list[int]:
        return self.tokenizer.encode_chat(messages, add_generation_prompt=generation_prompt)

    def _keep_for(self, system: str | None) -> int:
        """Rotating caches never evict the system prompt."""
        if self.max_kv_size is None:
            return self.default_keep
        keep = len(self._render_ids([{"role": "system", "content": system}], False)) if system else self.default_keep
        if keep >= self.max_kv_size:
            raise MlxLlamaError(
                f"the system prompt takes {keep} tokens; --max-kv-size ({self.max_kv_size}) must be larger"
            )
        return keep

    def _new_cache(self, keep: int | None = None) -> None:
        self.keep = self.keep if keep is None else keep
        self.cache = self.model.make_cache(self.max_kv_size, self.keep)
        self.cached_ids: list[int] = []
        self._in_sync = False  # True right after a turn: the cache ends with that turn's answer

    # ---- conversation edits -------------------------------------------------------

    def reset(self) -> None:
        """A new conversation with the same system prompt (its cached tokens are reused)."""
        self._unstarted = None
        self.messages = self.messages[:1] if self.system is not None else []
        self._in_sync = False

    def set_system(self, text: str | None) -> None:
        """Replace the system prompt, keeping the conversation; the cache follows at the next turn."""
        keep = self._keep_for(text)  # may refuse before anything changes
        self._drop_unstarted()
        rest = self.messages[1:] if self.system is not None else self.messages
        self.messages = ([{"role": "system", "content": text}] if text else []) + rest
        if self.rotating and keep != self.keep:
            self._new_cache(keep)
        self._in_sync = False

    def set_messages(self, messages: list[Message]) -> None:
        messages = validate_messages(messages)
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        keep = self._keep_for(system)
        self._unstarted = None
        self.messages = messages
        if self.rotating and keep != self.keep:
            self._new_cache(keep)
        self._in_sync = False

    def save(self, path: str | Path) -> None:
        self._drop_unstarted()
        try:
            Path(path).write_text(json.dumps({"messages": self.messages}, ensure_ascii=False, indent=2) + "\n")
        except OSError as e:
            raise MlxLlamaError(f"cannot write {path}: {e.strerror or e}") from None

    def load(self, path: str | Path) -> None:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise MlxLlamaError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        except json.JSONDecodeError as e:
            raise MlxLlamaError(f"{path} is not valid JSON: {e}") from None
        self.set_messages(validate_messages(data, str(path)))

    # ---- prompt cache -------------------------------------------------------------

    def adopt_cache(self, cache: list, ids: list[int]) -> None:
        """Start from a restored cache holding `ids` (a prompt cache file)."""
        self.cache, self.cached_ids, self._in_sync = cache, list(ids), False

    def first_prompt_ids(self) -> list[int] | None:
        """The ids of the first turn's whole prompt, while the cache still starts with them."""
        if self.first_prompt_len is None:
            return None
        return self.cached_ids[: self.first_prompt_len]

    # ---- a turn -------------------------------------------------------------------

    def _fit_context(self) -> None:
        """Growing cache: drop the oldest turns until the prompt and room for an answer fit."""
        if self.rotating:
            return
        limit = self.context_limit
        reserve = min(self.max_tokens, limit // 2)
        first = 1 if self.system is not None else 0
        dropped = 0
        n = len(self._render_ids(self.messages))
        while n + reserve > limit:
            users = [i for i in range(first + 1, len(self.messages)) if self.messages[i]["role"] == "user"]
            if not users:
                break
            dropped += users[0] - first
            del self.messages[first : users[0]]
            n = len(self._render_ids(self.messages))
        if n >= limit:
            raise MlxLlamaError(
                f"the message does not fit: the prompt would take {n} tokens, the model's context is {limit}"
            )
        if dropped:
            self._in_sync = False
            self.notify(f"[context full: dropped the {dropped} oldest messages, {n} tokens kept]")

    def _continuation_ids(self) -> list[int] | None:
        """Rotating fallback: the ids that close the last answer and open the new turn."""
        before = self.tokenizer.apply_chat_template(self.messages[:-1], add_generation_prompt=False)
        text = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
        if not text.startswith(before) or self._eot is None:
            return None
        close = [] if self.cached_ids and self.cached_ids[-1] in self.tokenizer.stop_ids else [self._eot]
        return close + self.tokenizer.encode(text[len(before):])

    def _new_ids(self, info: dict[str, Any]) -> list[int]:
        """Bring the cache to the longest usable prefix; returns the ids still to feed.

        `info` receives how the turn started: tokens reused, rolled back, and the mode.
        """
        self._fit_context()
        full = self._render_ids(self.messages)
        p = prompt_cache.common_prefix(self.cached_ids, full)
        p = min(p, len(full) - 1)  # feed at least one token: its logits start the answer
        info.update(reused=p, rolled_back=0, mode="exact")
        if p < len(self.cached_ids):
            extra = len(self.cached_ids) - p
            if prompt_cache.rollback(self.cache, extra):
                del self.cached_ids[p:]
                info["rolled_back"] = extra
            else:
                cont = self._continuation_ids() if self._in_sync else None
                if cont is not None:
                    info.update(reused=len(self.cached_ids), mode="continued")
                    return cont
                self._new_cache()
                info.update(reused=0, mode="rebuilt")
                p = 0
        return full[p:]

    def ask(self, text: str) -> Iterator[str]:
        """Add a user message; returns the answer's text pieces as they are generated.

        The answer is recorded when the iterator ends or is closed (Ctrl-C keeps
        the partial answer).
        """
        self._drop_unstarted()
        message = {"role": "user", "content": text}
        self.messages.append(message)
        try:
            stats = GenerationStats()
            new_ids = self._new_ids(stats.extra)
            tokens = generate_tokens(
                self.model, new_ids, sampler=self.sampler, max_tokens=self.max_tokens, cache=self.cache,
                prefill_step_size=self.prefill_step_size, stop_ids=self.tokenizer.stop_ids, stats=stats,
            )
        except BaseException:
            if self.messages and self.messages[-1] is message:
                self.messages.pop()
            raise
        self.last_stats = stats
        self._unstarted = message
        return self._answer(tokens, new_ids)

    def _drop_unstarted(self) -> None:
        """Forget a question whose answer was never started (closed before its first step):
        neither it nor an answer reached the cache."""
        message, self._unstarted = self._unstarted, None
        if message is not None and self.messages and self.messages[-1] is message:
            self.messages.pop()

    def _answer(self, tokens: Iterator[int], new_ids: list[int]) -> Iterator[str]:
        self._unstarted = None
        base = len(self.cached_ids)
        generated: list[int] = []

        def recorded() -> Iterator[int]:
            for tok in tokens:
                generated.append(tok)
                yield tok

        try:
            yield from stream_text(recorded(), self.tokenizer)
        finally:
            tokens.close()
            self._record(base, new_ids, generated)

    def _record(self, base: int, new_ids: list[int], generated: list[int]) -> None:
        """Account for what reached the cache, however the turn ended."""
        fed = new_ids + generated
        offsets = {c.offset for c in self.cache}
        n = offsets.pop() - base if len(offsets) == 1 else -1
        if n > len(fed) and prompt_cache.rollback(self.cache, n - len(fed)):
            n = len(fed)  # a token was fed but never handed out
        if 0 <= n <= len(fed):
            self.cached_ids += fed[:n]
            if self.first_prompt_len is None and n >= len(new_ids):
                self.first_prompt_len = base + len(new_ids)
            self._in_sync = n >= len(new_ids)  # the cache ends with this answer
        else:  # interrupted mid-update: start over at the next turn
            self._new_cache()
        content = self.tokenizer.decode([t for t in generated if t not in self.tokenizer.stop_ids])
        self.messages.append({"role": "assistant", "content": content})
