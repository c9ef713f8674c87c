"""What a request asks of raylm's engine and what it gets back: sampling settings, their
checks, and the streamed outputs. No torch: the replica's side of the engine's process
(raylm/serve/engine_process.py) and the OpenAI handlers import only this."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

MAX_LOGPROBS = 20  # the OpenAI API's cap on top_logprobs; more is a slow response, not a use


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings; `validate` checks ranges, `Engine.check` the rest."""

    max_tokens: int = 16  # new tokens; 0 allowed with echo (prompt scoring only)
    temperature: float = 1.0  # 0 = greedy; the OpenAI API's default
    top_p: float = 1.0  # nucleus sampling off by default, as in the OpenAI API
    top_k: int = 0  # 0 = off
    stop: tuple[str, ...] = ()  # the output is cut exactly before the first match, finish "stop"
    stop_token_ids: tuple[int, ...] = ()  # e.g. eos / end-of-turn id; not included in the output
    seed: int | None = None  # per-request torch.Generator; None = a fresh random seed
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob plus top-k alternatives
    echo: bool = False  # the first Output carries the prompt's token logprobs

    def __post_init__(self):
        # The app builds these from JSON, where lists are natural; a single stop string is
        # the OpenAI API's shorthand for a list of one.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"{name}={getattr(self, name)!r}: {why}")

        if not _is_int(self.max_tokens) or self.max_tokens < 0:
            bad("max_tokens", "expected an integer >= 0")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", "expected a finite number >= 0 (0 = greedy)")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "expected a number in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "expected an integer >= 0 (0 = off)")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "expected non-empty strings")
        if not isinstance(self.stop_token_ids, tuple) or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "expected token ids (integers >= 0)")
        if self.seed is not None and (not _is_int(self.seed) or not -(2 ** 63) <= self.seed < 2 ** 64):
            bad("seed", "expected an integer in [-2**63, 2**64) or None")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"expected an integer in [0, {MAX_LOGPROBS}] or None")
        if not isinstance(self.echo, bool):
            bad("echo", "expected true or false")
        if self.max_tokens == 0 and not self.echo:
            bad("max_tokens", "0 is only meaningful with echo (scoring the prompt)")


def check_request(prompt_ids: Sequence[int], params: SamplingParams, vocab: int, max_seq_len: int) -> None:
    """`Engine.check`: ValueError naming the field."""
    params.validate()
    if not len(prompt_ids):
        raise ValueError("prompt: empty (at least one token is needed)")
    for t in prompt_ids:
        if not _is_int(t) or not 0 <= t < vocab:
            raise ValueError(f"prompt: token id {t!r} is outside the vocabulary (0..{vocab - 1})")
    for t in params.stop_token_ids:
        if t >= vocab:
            raise ValueError(f"stop_token_ids: token id {t} is outside the vocabulary (0..{vocab - 1})")
    if len(prompt_ids) + params.max_tokens > max_seq_len:
        raise ValueError(f"max_tokens={params.max_tokens}: the prompt's {len(prompt_ids)} tokens plus "
                         f"max_tokens exceed the context of {max_seq_len} tokens")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class TokenLogprob:
    token_id: int
    token: str  # the token's text (a byte piece such as "<0xE2>" where it is part of a character)
    logprob: float  # log_softmax of the model's logits at this position
    top: list[tuple[str, float]]  # the k most likely tokens there, most likely first


@dataclass
class Output:
    """What one engine step produced for a request, streamed in order."""

    token_ids: list[int]  # new this step (stop tokens excluded; a stop string's tokens included)
    text: str  # new text this step (held back while it could still become a stop string)
    logprobs: list[TokenLogprob] | None  # one per token_ids entry, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None  # first Output only, with echo (first token: None)
    finish_reason: str | None  # None until the last: "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int  # running totals, for usage


class Outputs:
    """A queued request's Outputs, the last with its finish_reason (`Engine.open`,
    `EngineProcess.open`). The request is in the engine's queue from the moment this exists,
    not from its first read: a server sends it on before its response starts. Read it as an
    async iterator, or hand each item to a function as it arrives (`listen`: no task to wake
    per item and engine step). An exception from the engine ends it. `close()` (or `aclose()`)
    frees the request's slot within one step if it has not ended, whether it was read or not."""

    def __init__(self, release: Callable[[bool], None]):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._listener: Callable | None = None
        self._release = release  # the engine's: release(ended), once, when these end or close
        self._done = False

    def put_nowait(self, item) -> None:
        """The engine's side, on the event loop: one Output or exception."""
        if self._listener is None:
            self._queue.put_nowait(item)
            return
        if isinstance(item, BaseException) or item.finish_reason is not None:
            self._end(True)
        self._listener(item)

    def listen(self, fn: Callable) -> None:
        """Call `fn(item)` with every item from now on (those already here first), on the event
        loop, instead of queuing them for a reader."""
        self._listener = fn
        while not self._queue.empty():
            self.put_nowait(self._queue.get_nowait())

    def __aiter__(self) -> Outputs:
        return self

    async def __anext__(self) -> Output:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._end(True)
            raise item
        if item.finish_reason is not None:
            self._end(True)
        return item

    def close(self) -> None:
        self._end(False)

    async def aclose(self) -> None:
        self._end(False)

    def _end(self, ended: bool) -> None:
        if not self._done:
            self._done = True
            self._release(ended)


async def read_lazily(open_outputs: Callable[[], Outputs]) -> AsyncIterator[Output]:
    """The engines' `generate`: `open_outputs()` at the first read, then its Outputs; closing
    this generator, or cancelling the task reading it, closes them."""
    outputs = open_outputs()
    try:
        async for out in outputs:
            yield out
    finally:
        outputs.close()


class EngineClosed(RuntimeError):
    """`generate` after `close()`: the app answers 503."""


class EngineProcessDied(EngineClosed):
    """The engine's process exited while the replica still needed it (a bug, out of memory, a
    kill): the app answers 503, and Serve's health check replaces the replica."""
