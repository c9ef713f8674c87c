"""The OpenAI endpoints over an engine: requests in, JSON or server-sent events out. No Ray.

`OpenAIService` turns a validated request into engine requests (one per prompt and choice:
`n > 1` is n engine requests; with a seed, choice i, counted over all prompts, gets seed + i,
as `raylm generate` (`raylm.generate.complete`) seeds prompt i), then assembles
OpenAI's response bodies from the engine's per-step outputs. It enforces the limits that
depend on the model (context length, vocabulary) and the app's own per-request timeout, and
it stops a request's engine work when its client goes away (see `_race`), whatever Serve's
proxy was told by the client's headers.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from raylm.config import ServeConfig
from raylm.serve import protocol as P
from raylm.serve.sampling import EngineClosed, EngineProcessDied, Output, Outputs, SamplingParams

log = logging.getLogger("raylm.serve")

_DONE = object()  # a choice's producer finished


class ClientGone(Exception):
    """The client disconnected; nobody is left to answer."""


@dataclass
class _Choice:
    """One engine request: what it was asked and what came back so far."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    prompt_text: str = ""  # echoed prompt, completions only
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    echo_sent: bool = False  # streaming: the echoed prompt leads the choice's first chunk
    texts: dict = field(default_factory=dict)  # `P.own_texts`: the tokens whose text is not their piece
    offsets: P.TextOffsets = field(init=False)  # streaming: text_offset across chunks
    # Where each `logprobs` entry's text begins in `text` (as text_offset counts), and whether a
    # stop string cut `text`: the engine's outputs still carry the tokens of the stop string
    # (and of any text after it), which are not part of the answer (see `answer_logprobs`).
    starts: list[int] = field(default_factory=list)
    cut: bool = False
    _starts_at: P.TextOffsets = field(init=False)
    sent_chars: int = 0  # streaming: generated characters sent so far
    sent_logprobs: int = 0  # streaming: `logprobs` entries sent so far

    def __post_init__(self):
        self.offsets, self._starts_at = P.TextOffsets(0, self.texts), P.TextOffsets(0, self.texts)

    def add(self, out: Output) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        if out.logprobs:
            self.logprobs += out.logprobs
            self.starts += [self._starts_at.take(e.token, e.token_id) for e in out.logprobs]
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.completion_tokens = out.completion_tokens
        if out.finish_reason == "stop" and out.token_ids:  # a stop string (a stop token ends with no token)
            self.cut = True
        if out.finish_reason:
            self.finish_reason = "length" if out.finish_reason == "abort" else out.finish_reason

    def answer_logprobs(self) -> list:
        """The logprobs of the tokens of the returned text: after a stop string's cut, only the
        tokens whose text begins before the cut (one that straddles it is kept, as its text
        begins in the answer; the stop string's own tokens, and any after them, are not)."""
        if not self.cut:
            return self.logprobs
        return self.logprobs[:sum(1 for s in self.starts if s < len(self.text))]

    def stream_logprobs(self, out: Output) -> list:
        """Streaming: the logprobs to send with `out` (this choice's next outputs, coalesced):
        those of the tokens whose text has begun in the text sent so far, and at the end the
        rest of `answer_logprobs`. The engine sends a token's logprob at once but holds back its
        text while it could still become a stop string, so the logprobs wait with the text."""
        self.sent_chars += len(out.text)
        first, end = self.sent_logprobs, self.sent_logprobs
        if out.finish_reason and not self.cut:
            end = len(self.logprobs)
        else:
            while end < len(self.logprobs) and self.starts[end] < self.sent_chars:
                end += 1
        self.sent_logprobs = end
        return self.logprobs[first:end]


def _coalesce(items: list) -> list:
    """The (choice, item) pairs that arrived while the stream was busy sending, with each
    choice's consecutive outputs merged into one: one event per choice instead of one per
    engine step, so a server behind on sending (under load) does less work per token, and
    an idle one sends every step's output at once as before. Order within a choice is kept."""
    out: list = []
    last: dict = {}  # choice index -> index in `out` of its latest output still open for merging
    for c, item in items:
        key = None if c is None else c.index
        i = last.get(key)
        if isinstance(item, Output) and i is not None:
            a = out[i][1]
            out[i] = (c, Output(a.token_ids + item.token_ids, a.text + item.text,
                                None if a.logprobs is None else a.logprobs + (item.logprobs or []),
                                a.prompt_logprobs if a.prompt_logprobs is not None else item.prompt_logprobs,
                                item.finish_reason, item.prompt_tokens, item.completion_tokens))
        else:
            out.append((c, item))
            i = len(out) - 1 if isinstance(item, Output) else None
        if i is None or out[i][1].finish_reason is not None:
            last.pop(key, None)
        else:
            last[key] = i
    return out


@dataclass
class _Prompt:
    ids: list[int]
    text: str


@dataclass
class _Echo:
    """A TokenLogprob stand-in for an echoed prompt's first token, which has no logprob."""

    token: str
    logprob: float | None = None
    top: list = field(default_factory=list)
    token_id: int | None = None


class OpenAIService:
    """The replica's streams send at most about one SSE event per `cfg.stream_event_interval_s`
    between them: after an event, a stream holds its next outputs for that interval times the
    number of other streams in flight, then sends them as one event (several tokens in one
    chunk, as the OpenAI stream format allows). A choice's first text and its end, errors and
    a disconnect go out at once, and a lone stream is never held; 0 sends every engine step's
    output as its own event. Why: an event costs Serve about 1.4 ms of CPU (the replica's
    relay, the proxy's, the client's read) however many tokens it carries. Measured on 2 CPU
    cores, 16 streams of the tiny model (a shared, busy machine): with one event per token,
    Serve's proxy and the replica's relaying spent ~1.8 ms of CPU per token against the
    engine's ~0.45; with a 5 ms hold, ~0.8 ms, and output tokens/s went from ~490-570 to
    ~830-1,100 (benchmarks/serve_load.py). 16 streams then get an event every ~75 ms, each
    with the ~4-10 tokens made meanwhile. Behind HAProxy (no proxy actor relaying events) the
    hold still paid: 0 gave 0.75x the output tokens/s of 5 ms, one run each."""

    def __init__(self, engine, cfg: ServeConfig, model_name: str):
        from raylm.tokenizer import END

        self.engine, self.cfg, self.model_name = engine, cfg, model_name
        self.tok = engine.tokenizer
        self.end_id = self.tok.special_ids[END]
        self.created = P.now()
        self.draining = False
        self.texts = P.own_texts(self.tok)  # for text_offset: "<|bos|>" adds no text, "<unk>" " ⁇ "
        self._streams = 0  # streaming responses in flight on this replica (see _hold_s)

    # ------------------------------------------------------------------ plain endpoints

    def models(self) -> dict:
        return {"object": "list", "data": [self.model(self.model_name)]}

    def model(self, name: str) -> dict:
        """GET /v1/models/{name} (the openai client's `models.retrieve`): the served model, or
        404 model_not_found naming it."""
        self._check_model(name)
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "raylm",
                "max_model_len": self.engine.max_seq_len}

    def ready(self) -> bool:
        return not self.draining

    async def close(self) -> None:
        self.draining = True
        await self.engine.close()

    # ------------------------------------------------------------------ generation endpoints

    async def completions(self, req: P.CompletionRequest, disconnected: Callable[[], Awaitable[None]],
                          deadline: float | None = None):
        """A response dict, or an async iterator of SSE lines when `req.stream`. `deadline`: the
        event loop's time at which the request's `request_timeout_s` ends, counted from its
        arrival (the body's reading takes its share); default: that long from now."""
        self._check_model(req.model)
        if req.max_tokens == 0 and not req.echo:
            raise P.APIError(400, "max_tokens: 0 returns nothing unless echo is true", "max_tokens")
        self._check_n(len(req.prompts()) * req.n)  # before any work: n and the prompts are the client's
        prompts = [self._prompt(p) for p in req.prompts()]
        choices = []
        for pi, prompt in enumerate(prompts):
            limit = req.max_tokens if req.max_tokens is not None else self._room(prompt.ids, "prompt", req.echo)
            for j in range(pi * req.n, (pi + 1) * req.n):  # the choices' indexes
                params = self._params(req, prompt.ids, limit, j, logprobs=req.logprobs, echo=req.echo,
                                      stop_ids=(self.tok.eos_id,))
                choices.append(_Choice(j, prompt.ids, params, prompt.text if req.echo else "",
                                       texts=self.texts))
        prompt_tokens = sum(len(p.ids) for p in prompts)
        rid = P.new_id("cmpl")
        if req.stream:
            return self._stream(rid, "text_completion", choices, prompt_tokens, req.include_usage, self._completion_chunk,
                                disconnected, req.continuous_usage, deadline)
        await self._race(self._run_all(rid, choices), disconnected, deadline)
        return {"id": rid, "object": "text_completion", "created": P.now(), "model": self.model_name,
                "choices": [{"index": c.index, "text": c.prompt_text + c.text,
                             "logprobs": self._completion_logprobs(c, req.logprobs, echo=req.echo),
                             "finish_reason": c.finish_reason} for c in choices],
                "usage": P.usage(prompt_tokens, sum(c.completion_tokens for c in choices))}

    async def chat(self, req: P.ChatCompletionRequest, disconnected: Callable[[], Awaitable[None]],
                   deadline: float | None = None):
        self._check_model(req.model)
        self._check_n(req.n)
        try:
            ids, _ = self.tok.encode_chat(req.chat(), add_generation_prompt=True)
        except ValueError as e:
            raise P.APIError(400, f"messages: {e}", "messages") from None
        limit = req.limit()
        name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        if limit == 0:
            raise P.APIError(400, f"{name}: must be at least 1 for chat", name)
        if limit is None:
            limit = self._room(ids, "messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        choices = [_Choice(j, ids, self._params(req, ids, limit, j, logprobs=top,
                                                stop_ids=(self.end_id, self.tok.eos_id), limit_field=name),
                           texts=self.texts)
                   for j in range(req.n)]
        rid = P.new_id("chatcmpl")
        if req.stream:
            return self._stream(rid, "chat.completion.chunk", choices, len(ids), req.include_usage, self._chat_chunk,
                                disconnected, req.continuous_usage, deadline)
        await self._race(self._run_all(rid, choices), disconnected, deadline)
        return {"id": rid, "object": "chat.completion", "created": P.now(), "model": self.model_name,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "logprobs": P.chat_logprobs(c.answer_logprobs()) if req.logprobs else None,
                             "finish_reason": c.finish_reason} for c in choices],
                "usage": P.usage(len(ids), sum(c.completion_tokens for c in choices))}

    # ------------------------------------------------------------------ request checks

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise P.APIError(404, f"model: {name!r} does not exist; this server serves {self.model_name!r}",
                             "model", code="model_not_found")

    def _check_n(self, total: int) -> None:
        if total > self.cfg.max_n:
            raise P.APIError(400, f"n: {total} choices in all (prompts x n) exceeds this server's limit of "
                                  f"{self.cfg.max_n}", "n")

    def _prompt(self, p: str | list[int]) -> _Prompt:
        if isinstance(p, str):
            ids = self.tok.encode(p)
            if not ids:
                raise P.APIError(400, "prompt: encodes to no tokens", "prompt")
            return _Prompt(ids, p)
        vocab = self.tok.vocab_size
        bad = next((t for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            raise P.APIError(400, f"prompt: token id {bad} is outside the vocabulary [0, {vocab})", "prompt")
        return _Prompt(list(p), self.tok.decode(p))

    def _room(self, prompt_ids: list[int], field: str, echo: bool = False) -> int:
        """max_tokens where the client gave none: what the prompt leaves of the context (none
        is enough for an echo, which scores the prompt)."""
        context, prompt_len = self.engine.max_seq_len, len(prompt_ids)
        if prompt_len > context or (prompt_len == context and not echo):
            raise P.APIError(400, f"{field}: its {prompt_len} tokens leave no room in the model's context of "
                                  f"{context} tokens", field, code="context_length_exceeded")
        return context - prompt_len

    def _params(self, req, prompt_ids: list[int], max_tokens: int, index: int, *, logprobs: int | None,
                stop_ids: tuple[int, ...], echo: bool = False, limit_field: str = "max_tokens") -> SamplingParams:
        """Choice `index`'s settings (its index in the response, over all prompts): seed + index,
        each choice its own stream, all reproducible, and a list of prompts seeded as
        `raylm.generate.complete` seeds it."""
        context, prompt_len = self.engine.max_seq_len, len(prompt_ids)
        if prompt_len + max_tokens > context:
            raise P.APIError(400, f"{limit_field}: the prompt's {prompt_len} tokens plus {limit_field}={max_tokens} "
                                  f"exceed the model's context of {context} tokens", limit_field,
                             code="context_length_exceeded")
        seed = None if req.seed is None else req.seed + index
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        if top_p == 0:  # OpenAI's API takes 0: a nucleus of the most likely token alone, i.e. greedy
            temperature, top_p = 0.0, 1.0
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=max(req.top_k or 0, 0),
            stop=req.stop_list(), stop_token_ids=tuple(i for i in stop_ids if i is not None and i >= 0),
            seed=seed, logprobs=logprobs, echo=echo)
        try:
            self.engine.check(prompt_ids, params)
        except ValueError as e:  # the engine names the field first: "max_tokens=...: ..."
            raise P.APIError(400, str(e), str(e).split("=")[0].split(":")[0].strip() or None) from None
        return params

    # ------------------------------------------------------------------ running

    def _open(self, rid: str, choices: list[_Choice]) -> list[Outputs]:
        """Queue every choice's engine request now (`Engine.open`): all of them, or none."""
        opened = []
        try:
            for c in choices:
                opened.append(self.engine.open(c.prompt_ids, c.params, request_id=f"{rid}-{c.index}"))
        except (EngineClosed, ValueError) as e:
            raise self._api_error(e) from None
        finally:
            if len(opened) < len(choices):
                for o in opened:
                    o.close()
        return opened

    def _api_error(self, e: BaseException) -> BaseException:
        """What a client hears of an exception from the engine: 503 once it is closing or gone,
        400 for a request it refused; anything else is a bug and stays as it is."""
        if isinstance(e, EngineClosed):
            why = str(e) if isinstance(e, EngineProcessDied) else "the server is shutting down"
            return P.APIError(503, f"{why}; retry on another replica", None, type="unavailable",
                              headers={"retry-after": str(max(1, round(self.cfg.retry_after_s)))})
        if isinstance(e, ValueError):
            return P.APIError(400, str(e), None)
        return e

    async def _run_all(self, rid: str, choices: list[_Choice]) -> None:
        """Every choice's outputs into it as they arrive (`Outputs.listen`, as a stream hears
        them: no task per choice), until all have ended. However this returns, cancelled
        included (`_race`: a disconnect, the timeout), it closes them, freeing their slots
        within a step."""
        finished = asyncio.get_running_loop().create_future()
        left = len(choices)

        def listener(c: _Choice) -> Callable:
            def heard(item) -> None:  # on the event loop, as the engine's items arrive
                nonlocal left
                if finished.done():
                    return
                try:
                    if isinstance(item, BaseException):
                        raise self._api_error(item)
                    c.add(item)
                except BaseException as e:  # noqa: BLE001 - the awaiting request raises it (a bug keeps its traceback)
                    finished.set_exception(e)
                    return
                if item.finish_reason is not None:
                    left -= 1
                    if not left:
                        finished.set_result(None)
            return heard

        opened = self._open(rid, choices)
        try:
            for c, o in zip(choices, opened):
                o.listen(listener(c))
            await finished
        finally:
            for o in opened:
                o.close()

    def _deadline(self, deadline: float | None) -> float:
        return asyncio.get_running_loop().time() + self.cfg.request_timeout_s if deadline is None else deadline

    async def _race(self, work: Awaitable, disconnected: Callable[[], Awaitable[None]], deadline: float | None = None):
        """`work` until the app's timeout (`deadline`), cancelled as soon as the client disconnects."""
        left = self._deadline(deadline) - asyncio.get_running_loop().time()
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({task, watch}, timeout=max(left, 0.0),
                                         return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            if watch in done:
                raise ClientGone()
            # x-should-retry: false, or the openai client (which retries a 408 twice by default)
            # sends work that took the whole limit again, holding a slot as long each time.
            raise P.APIError(408, f"the request ran past this server's limit of {self.cfg.request_timeout_s:g} s",
                             None, type="timeout", code="timeout", headers={"x-should-retry": "false"})
        finally:
            for t in (task, watch):
                t.cancel()
            await asyncio.gather(task, watch, return_exceptions=True)

    def _stream(self, rid: str, obj: str, choices: list[_Choice], prompt_tokens: int, include_usage: bool,
                chunk: Callable, disconnected: Callable[[], Awaitable[None]],
                usage_every_chunk: bool = False, deadline: float | None = None) -> AsyncIterator[str]:
        """SSE lines: each choice's new text and tokens, one event per wake-up (see the class
        docstring: under load an event carries several engine steps' outputs), then usage
        if asked, then [DONE]; with `usage_every_chunk`, each chunk also carries the usage of
        what has been sent so far. The engine's requests are queued before this returns (`_open`),
        their items handled as they arrive (`Outputs.listen`), and a disconnect watched by a
        task from then on: a disconnect or the timeout closes them (freeing their slots within
        a step) even if the proxy never cancels this generator, or never starts it."""
        created = P.now()
        loop = asyncio.get_running_loop()
        pending: list = []  # (choice, item) not yet sent, in arrival order
        wake = asyncio.Event()  # set when something in `pending` is due now
        hold_until = 0.0  # loop time before which only urgent items wake the stream (see _hold_s)
        started: set[int] = set()  # choices whose first text went out: later outputs may wait
        sent_tokens = {c.index: 0 for c in choices}  # completion tokens sent so far, by choice
        ended = False

        def with_usage(body: dict) -> dict:
            if usage_every_chunk:
                body["usage"] = P.usage(prompt_tokens, sum(sent_tokens.values()))
            elif include_usage:  # OpenAI's API: every chunk but the last has "usage": null
                body["usage"] = None
            return body

        def put(c, item, urgent: bool) -> None:
            pending.append((c, item))
            if urgent or loop.time() >= hold_until:
                wake.set()

        def listener(c: _Choice) -> Callable:
            def heard(item) -> None:  # on the event loop, as the engine's items arrive
                try:
                    if isinstance(item, BaseException):
                        put(c, self._api_error(item), True)
                        return
                    c.add(item)
                    put(c, item, c.index not in started)  # a choice's first text is urgent (TTFT)
                    if item.finish_reason is not None:
                        put(c, _DONE, True)
                except Exception as e:  # noqa: BLE001 - a bug here reaches the client as an error event
                    put(c, e, True)
            return heard

        async def watch() -> None:
            await disconnected()
            put(None, ClientGone(), True)
            end()  # also when the response never started reading the events

        def expire() -> None:
            # A timer, not a check between events: a client that stops reading (its connection
            # still open) leaves the generator waiting at a yield, and the engine's work with it.
            nonlocal expired
            expired = True
            wake.set()
            end()

        def end() -> None:
            nonlocal ended
            if not ended:
                ended = True
                self._streams -= 1
                for o in opened:
                    o.close()
                watching.cancel()
                expiry.cancel()

        # The engine gets the requests now, while the response starts: under load, every turn
        # of the replica's event loop before they go is a wait added to the time to first token.
        # Their items are handled as they arrive, not by a task per choice: a task's wake-up
        # per stream and engine step was much of a busy replica's work.
        opened = self._open(rid, choices)
        for c, o in zip(choices, opened):
            o.listen(listener(c))
        watching = asyncio.ensure_future(watch())
        self._streams += 1
        deadline = self._deadline(deadline)
        expired = False
        expiry = loop.call_at(deadline, expire)

        async def events() -> AsyncIterator[str]:
            nonlocal hold_until
            left = len(choices)
            try:
                # The role (chat) comes first; completions have no head (an echoed prompt goes
                # with the choice's first output).
                heads = [chunk(rid, created, obj, c, None, first=True) for c in choices]
                if any(h is not None for h in heads):
                    yield "".join(P.sse(with_usage(h)) for h in heads if h is not None)
                while left:
                    if not wake.is_set():  # sleep until something is due, or the deadline
                        timer = loop.call_at(min(deadline, hold_until) if pending else deadline, wake.set)
                        await wake.wait()
                        timer.cancel()
                    wake.clear()
                    if expired or loop.time() > deadline:
                        yield P.sse(P.error_body(f"the request ran past this server's limit of "
                                                 f"{self.cfg.request_timeout_s:g} s", "timeout", None, "timeout"))
                        return
                    got, pending[:] = pending[:], []
                    lines = []
                    for c, item in _coalesce(got):
                        if isinstance(item, ClientGone):
                            return
                        if isinstance(item, P.APIError):
                            yield "".join(lines) + P.sse(item.body())
                            return
                        if isinstance(item, BaseException):
                            log.error("request %s failed", rid, exc_info=item)
                            yield "".join(lines) + P.sse(P.error_body("internal error while generating", "server_error"))
                            return
                        if item is _DONE:
                            left -= 1
                            continue
                        if item.text or item.finish_reason:
                            started.add(c.index)
                        sent_tokens[c.index] = item.completion_tokens
                        lines.append(P.sse(with_usage(chunk(rid, created, obj, c, item))))
                    if left and lines:
                        # One yield per wake-up, however many lines: Serve relays each yield to
                        # the proxy as one message, and that, not the bytes, is what costs.
                        yield "".join(lines)
                        hold_until = loop.time() + self._hold_s()
                    elif lines:
                        yield "".join(lines) + self._tail(rid, obj, created, choices, prompt_tokens, include_usage)
                        return
                yield self._tail(rid, obj, created, choices, prompt_tokens, include_usage)
            finally:
                end()
                await asyncio.gather(watching, return_exceptions=True)

        return events()

    def _tail(self, rid, obj, created, choices: list[_Choice], prompt_tokens: int, include_usage: bool) -> str:
        if not include_usage:
            return P.sse("[DONE]")
        return P.sse({"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": [],
                      "usage": P.usage(prompt_tokens, sum(c.completion_tokens for c in choices))}) + P.sse("[DONE]")

    def _hold_s(self) -> float:
        """How long a stream holds its next outputs after sending an event (see the class docstring)."""
        return self.cfg.stream_event_interval_s * (self._streams - 1)

    # ------------------------------------------------------------------ response pieces

    def _completion_logprobs(self, c: _Choice, k: int | None, echo: bool, entries: list | None = None,
                             start: int = 0) -> dict | None:
        if k is None:
            return None
        if entries is None:
            entries = (self._echo_entries(c) if echo else []) + c.answer_logprobs()
        return P.completion_logprobs(entries, P.TextOffsets(start, self.texts))

    def _echo_entries(self, c: _Choice) -> list:
        lps = c.prompt_logprobs or []
        return [e if e is not None else _Echo("") if i >= len(c.prompt_ids) else
                _Echo(self._token_text(c.prompt_ids[i]), token_id=c.prompt_ids[i]) for i, e in enumerate(lps)]

    def _token_text(self, token_id: int) -> str:
        """A prompt token's own text, as the engine's logprobs give every other token's
        (`Engine.token_text`: a byte piece stays "<0xC3>", which `P.completion_logprobs` reads
        as its byte): its piece with SentencePiece's "▁" as a space."""
        return self.tok.id_to_piece(token_id).replace("\u2581", " ")

    def _completion_chunk(self, rid, created, obj, c: _Choice, out: Output | None, first: bool = False):
        k = c.params.logprobs
        if first:  # an echoed prompt goes with the first output, which carries its logprobs
            return None
        text, entries = out.text, c.stream_logprobs(out)
        if c.params.echo and not c.echo_sent:
            c.echo_sent = True
            text = c.prompt_text + text
            entries = self._echo_entries(c) + entries
        return {"id": rid, "object": obj, "created": created, "model": self.model_name,
                "choices": [{"index": c.index, "text": text,
                             "logprobs": P.completion_logprobs(entries, c.offsets) if k is not None else None,
                             "finish_reason": c.finish_reason if out.finish_reason else None}]}

    def _chat_chunk(self, rid, created, obj, c: _Choice, out: Output | None, first: bool = False):
        if first:
            delta, lps, finish = {"role": "assistant", "content": ""}, None, None
        else:
            delta = {"content": out.text} if out.text else {}
            lps = P.chat_logprobs(c.stream_logprobs(out)) if c.params.logprobs is not None else None
            finish = c.finish_reason if out.finish_reason else None
        return {"id": rid, "object": obj, "created": created, "model": self.model_name,
                "choices": [{"index": c.index, "delta": delta, "logprobs": lps, "finish_reason": finish}]}
