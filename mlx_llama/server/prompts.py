"""From a validated OpenAI request to the engine's `GenerationRequest`.

Here live the checks that need the model: its name, its tokenizer and chat
template, its context length, the vocabulary a token-id prompt must stay in,
and the sampling fields we do not implement (refused, never ignored).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from mlx_llama.cli.options import sampling_params
from mlx_llama.errors import MlxLlamaError
from mlx_llama.generation.requests import GenerationRequest
from mlx_llama.generation.sampler import SamplingParams
from mlx_llama.interfaces import Message, TokenizerLike
from mlx_llama.server.errors import ApiError
from mlx_llama.server.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from mlx_llama.server.structured import constraint_for
from mlx_llama.server.tools import check_tools, prompt_tools

AnyRequest = ChatCompletionRequest | CompletionRequest


@dataclass(frozen=True)
class ServedModel:
    """What the web side knows of the model; it never holds the model or its arrays."""

    name: str
    tokenizer: TokenizerLike | None
    context_length: int  # prompt + generated tokens of one request
    default_max_tokens: int  # for requests that do not set max_tokens
    vocab_size: int
    eos_ids: frozenset[int]
    created: int
    generation_config: dict[str, Any] = field(default_factory=dict)
    # Prompts longer than this share one prefill among a request's n choices (server.choices):
    # the prefix cache's alignment, the engine's prefill chunk.  None: no prefix cache, no sharing.
    shared_prefix: int | None = None

    @property
    def stop_ids(self) -> frozenset[int]:
        return self.tokenizer.stop_ids if self.tokenizer is not None else self.eos_ids


def _unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param=param, code="unsupported_parameter")


def check_request(request: AnyRequest, served: ServedModel) -> None:
    """Refuse an unknown model and every field whose value we cannot honour."""
    if request.model is not None and request.model != served.name:
        raise ApiError(404, f"the model {request.model!r} does not exist; this server serves {served.name!r}",
                       param="model", code="model_not_found")
    if request.logit_bias:
        raise _unsupported("logit_bias", "not supported")
    if isinstance(request, CompletionRequest):
        if request.echo:
            raise _unsupported("echo", "not supported")
        if request.suffix:
            raise _unsupported("suffix", "not supported (no fill-in-the-middle)")
        if request.best_of not in (None, 1):
            raise _unsupported("best_of", "only best_of=1 is supported")
    else:
        if request.top_logprobs is not None and not request.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        check_tools(request)
    if request.stream_options is not None and not request.stream:
        raise ApiError(400, "stream_options needs stream: true", param="stream_options", code="invalid_value")


def _template_message(index: int, m: ChatMessage) -> Message:
    """A request message as chat templates take it (tool-call arguments parsed, as they `tojson` them)."""
    where = f"messages[{index}]"
    if m.tool_calls is not None and m.role != "assistant":
        raise ApiError(400, f"{where}: only assistant messages carry tool_calls", param="messages",
                       code="invalid_value")
    if m.content is None and not m.tool_calls:
        raise ApiError(400, f"{where}: content is required", param="messages", code="invalid_value")
    message: Message = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.tool_calls:
        calls = []
        for call in m.tool_calls:
            try:
                arguments = json.loads(call.function.arguments)
            except json.JSONDecodeError:
                arguments = None
            if not isinstance(arguments, dict):
                raise ApiError(400, f"{where}: the arguments of tool call {call.id!r} are not a JSON object",
                               param="messages", code="invalid_value")
            calls.append({"type": "function", "function": {"name": call.function.name, "arguments": arguments}})
        message["tool_calls"] = calls
    return message


def chat_prompt_ids(request: ChatCompletionRequest, served: ServedModel) -> list[int]:
    if served.tokenizer is None:
        raise ApiError(400, f"{served.name} has no tokenizer, so it cannot chat: "
                       "send token ids as `prompt` to /v1/completions", param="messages", code="no_tokenizer")
    messages = [_template_message(i, m) for i, m in enumerate(request.messages)]
    try:
        return served.tokenizer.encode_chat(messages, tools=prompt_tools(request))
    except MlxLlamaError as e:
        raise ApiError(400, str(e), param="messages", code="invalid_value") from None


def completion_prompt_ids(request: CompletionRequest, served: ServedModel) -> list[int]:
    prompt: Any = request.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise _unsupported("prompt", "one prompt per request (a list of several is not supported)")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if served.tokenizer is None:
            raise ApiError(400, f"{served.name} has no tokenizer: send `prompt` as a list of token ids",
                           param="prompt", code="no_tokenizer")
        return served.tokenizer.encode(prompt, add_bos=True)
    bad = [t for t in prompt if not 0 <= t < served.vocab_size]
    if bad:
        raise ApiError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {served.vocab_size})",
                       param="prompt", code="invalid_value")
    return list(prompt)


def choice_seed(seed: int | None, choice: int) -> int | None:
    """Choice 0 samples with the request's seed (n=1 and n>1 agree on it); choice i > 0 with one
    derived from (seed, i), so choices differ and a seeded request is reproducible."""
    if seed is None or choice == 0:
        return seed
    return int(np.random.SeedSequence([seed, choice]).generate_state(1, np.uint64)[0])


def generation_request(request: AnyRequest, prompt_ids: Sequence[int], served: ServedModel,
                       choice: int = 0) -> GenerationRequest:
    """The engine request of choice `choice`: the prompt must leave room for a token; max_tokens stops
    at the context's end.  Each choice gets its own seed (`choice_seed`) and its own constraint.

    Without max_tokens a request gets the server's default, not the whole context: the engine
    reserves KV for prompt + max_tokens, and a 128K-token reservation would not fit its budget.
    """
    if not prompt_ids:
        raise ApiError(400, "the prompt is empty", param="prompt", code="invalid_value")
    room = served.context_length - len(prompt_ids)
    if room < 1:
        param = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens but the context is "
                       f"{served.context_length}: shorten it", param=param, code="context_length_exceeded")
    limit = request.max_tokens
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        limit = request.max_completion_tokens
    if limit is None:
        limit = served.default_max_tokens
    opts = dict(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                min_p=request.min_p, repetition_penalty=request.repetition_penalty,
                repetition_context_size=SamplingParams.repetition_context_size,
                presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
                seed=choice_seed(request.seed, choice))
    try:
        sampling = sampling_params(opts, served.generation_config)
    except MlxLlamaError as e:
        raise ApiError(400, str(e), code="invalid_value") from None
    if isinstance(request, ChatCompletionRequest):
        top_logprobs = (request.top_logprobs or 0) if request.logprobs else None
    else:
        top_logprobs = request.logprobs
    return GenerationRequest(
        prompt_ids=list(prompt_ids), max_tokens=min(limit, room), sampling=sampling,
        stop_ids=served.stop_ids, top_logprobs=top_logprobs,
        constraint=constraint_for(request, served.tokenizer, served.vocab_size),
    )
