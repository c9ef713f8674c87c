"""Continuous batching for raylm's decoder on a CPU or one GPU: plain torch, no Ray.

Requests join and leave a running decode batch at every step. One engine step is

    1. free the slots of requests whose consumer went away (aclose, a cancelled task);
    2. admit every waiting request that a free slot can take;
    3. prefill: up to `prefill_tokens_per_step` prompt tokens over all requests whose prompt
       is not yet in the cache, each first getting an equal share of that budget (a long
       prompt goes in chunks over several steps, and a short one queued behind it still
       gets in at once), batched into one forward of padded rows (`_prefill_groups`); a
       request whose prompt is now whole samples its first token, and these first tokens
       are sent before the decode step;
    4. one decode step for every request whose prompt is whole: each row feeds its last
       token at its own position and gets the next token's logits. Between two of its
       layers, requests that arrived meanwhile are admitted and prefilled as in 2-3, in slots
       the step does not read, and their first tokens sent (`_decode`).

so a request that arrives while a step runs gets its first token after the layer in progress
and its own prefill (or, arriving during a prefill, after that and its own): it waits for no
whole decode step and for no other prompt beyond the budget, a long prompt delays the running
rows by at most one budget's prefill a step (the prefill inside a decode step gets what the
step's own left), and a finished or abandoned request's slot is reused one step later. The model runs on one dedicated thread
(the "engine thread"), never on the asyncio event loop, which only queues requests and
relays outputs; torch releases the GIL inside its kernels, so the server stays responsive
while a step runs.

The KV cache is slotted (`SlotCache`, one per layer): fixed buffers of [max_batch_size,
kv_heads, max_seq_len, head_dim], one slot per running request, each slot at its own
length. The running requests occupy slots 0..n-1 (when one leaves, the last one's keys and
values move into its slot), so a decode step reads the contiguous views [0:n, :, :keys] with
keys = the longest running sequence + 1: no copy, no work for empty slots (a row whose
prompt is still being prefilled rides along as a dummy; a prefill reads the slots of its own
rows, wherever they are, as a copy). Each row attends
to its own length only (`SlotCache.visible`), and RoPE takes each row's own position
(`Transformer.hidden_states` with a (B,) tensor `start`). With `fixed_shapes=True` every
decode step instead has the same shapes (all slots, all keys, idle rows fed a dummy token at
position 0 of their own unused slot): what torch.compile / CUDA graphs need; see `compile`.

Sampling is `raylm.generate.sample_token` per request, with the request's own
`torch.Generator(device).manual_seed(seed)`, drawn in the same order as
`raylm.generate.generate` (one draw per sampled token, first token from the prefill's
logits), over the tokenizer's ids only (a model's vocabulary padded past them has rows no
text comes from: `vocab_size`): the same prompt and settings give the same tokens as
`generate(model, prompt, max_tokens, temperature, top_k, eos_id, seed, vocab_size=tok.vocab_size,
top_p=top_p)`, and logprobs are normalised over those ids.

Parity whatever shares the batch, and why it holds. A row's math is `generate`'s: a prefill
chunk is the prompt's tokens at their own positions, attending (masked) to the row's cached
keys and causally within the chunk, so chunks give the whole prompt's math; padding and other
rows in the forward, like batching in a decode step, add only masked key slots and other rows
in the matmuls. None of this changes the exact math; all of it changes the floating-point
rounding (BLAS picks kernels and blocking by shape, SDPA's sums by key length): measured on the tiny test model in fp32, a
row decoded alone over generate's key length is bit-identical to `generate`, and batched
with others it is within 7e-6 of it. So the engine guarantees logits equal to rounding
(asserted to 1e-5 in fp32, through the logprobs it reports), and tokens equal wherever the
choice is not a tie within that rounding: a greedy top-2 gap under ~1e-5, or a sampling draw
within ~1e-6 of a boundary of the cumulative distribution (odds of about one in 10^5 per
token). The tests compare tokens exactly, and for greedy requests they check, at the first
token that differs if any, that the reference's top-2 margin there is such a tie; anything
else fails. Bit-for-bit batch invariance would need every kernel to reduce in an order
independent of the batch (e.g. one row at a time, the cost batching exists to avoid). In
bf16 (GPUs) rounding is ~1e-2, so near-ties are more frequent: run fp32 where exact
reproducibility of sampled text matters.

Scope kept out of the engine: `n > 1` completions are the app's job (it submits n requests,
seeds derived from the request's seed, e.g. seed + i, as `raylm.generate.complete` does);
logprobs are those of the model's distribution (log_softmax of the raw logits),
not of the temperature/top-k/top-p-processed one, as the OpenAI API reports them.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import torch

from raylm.generate import sample_token
from raylm.serve.sampling import (EngineClosed, Output, Outputs, SamplingParams, TokenLogprob, _is_int, check_request,
                                  read_lazily)


class SlotCache:
    """One layer's keys/values for up to `batch` sequences, each slot at its own length.

    `Attention` calls it as it calls `raylm.model.KVCache` with a tensor position:
    `write(positions, ...)` and `visible(positions)`, here with `positions` (B, T), each row
    its own, for a decode step (T = 1) and for a prefill chunk alike. Both act on the rows
    `rows` (set by the engine before each forward: a slice of contiguous slots, or a tensor
    of slots) and read `keys` key slots: the longest sequence there, or all for fixed shapes.
    """

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = torch.arange(max_len, device=device)
        self.rows, self.keys = slice(0, batch), max_len
        for t in (self.k, self.v, self.slots):  # as KVCache: CUDA graphs update them in place
            torch._dynamo.mark_static_address(t)
            torch._dynamo.mark_static(t)  # fixed sizes, even in the dynamic-shape prefill graph

    def visible(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, keys) boolean mask: row b's query at position p sees its slots 0..p."""
        return (self.slots[: self.keys] <= positions[..., None]).unsqueeze(1)

    def write(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k/v (B, H, T, D) into the window's rows at `positions` (B, T); returns the window's keys.

        `rows` is a slice (a decode step: views of the buffers, no copy) or a (B,) tensor of
        slots (a prefill of requests in any slots: written in place, read back as a copy)."""
        B, T = positions.shape
        if isinstance(self.rows, slice):
            rows = torch.arange(B, device=positions.device)[:, None].expand(B, T)
            kw, vw = self.k[self.rows], self.v[self.rows]  # views: index_put_ writes the buffers
        else:
            rows, kw, vw = self.rows[:, None].expand(B, T), self.k, self.v
        kw.transpose(1, 2).index_put_((rows, positions), k.transpose(1, 2).to(kw.dtype))
        vw.transpose(1, 2).index_put_((rows, positions), v.transpose(1, 2).to(vw.dtype))
        if not isinstance(self.rows, slice):
            return self.k[self.rows, :, : self.keys], self.v[self.rows, :, : self.keys]
        return kw[:, :, : self.keys], vw[:, :, : self.keys]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` positions into slot `dst` (compaction)."""
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]


class _TextStream:
    """Incremental detokenization with exact stop strings.

    Text is decoded over a window that starts one emitted token back (so a piece's leading
    space or a multi-byte character split over byte pieces comes out right), and nothing is
    emitted while the text still ends in an incomplete character (U+FFFD) or in a prefix of
    a stop string: a stop string split across tokens is cut exactly, and text that was
    streamed is never taken back."""

    def __init__(self, decode, stop: tuple[str, ...]):
        self.decode, self.stop = decode, stop
        # Per stop string, its KMP failure table and how much of it the text now ends in:
        # the hold-back costs a step time linear in the new text, where trying every prefix
        # of every stop string cost time quadratic in their length (16,000-character stop
        # strings: 17 ms a token, with the whole batch waiting).
        self._borders = [_borders(s) for s in stop]
        self._matched = [0] * len(stop)
        self._scanned = 0  # characters of `text` the matches above have read
        self.ids: list[int] = []
        self.prefix = self.read = 0  # window start; end of the ids already in `text`
        self.text = ""  # complete characters decoded so far
        self.sent = 0  # characters of `text` already emitted

    def push(self, token_id: int) -> tuple[str, bool]:
        """(text to emit now, whether a stop string matched: then the request ends)."""
        self.ids.append(token_id)
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release()

    def flush(self) -> str:
        """Everything not yet emitted: the request ends without a stop string."""
        self.text += self.decode(self.ids[self.prefix:])[len(self.decode(self.ids[self.prefix:self.read])):]
        self.prefix = self.read = len(self.ids)
        out, self.sent = self.text[self.sent:], len(self.text)
        return out

    def _release(self) -> tuple[str, bool]:
        end, stopped = len(self.text), False
        for s in self.stop:
            # Held-back text ensures no match starts inside what was already sent.
            i = self.text.find(s, self.sent)
            if i >= 0 and i < end:
                end, stopped = i, True
        new, self._scanned = self.text[self._scanned:], len(self.text)
        for j, (s, border) in enumerate(zip(self.stop, self._borders)):
            k = self._matched[j]
            for c in new if s else ():
                if k == len(s):
                    k = border[k - 1]
                while k and s[k] != c:
                    k = border[k - 1]
                k += s[k] == c
            self._matched[j] = k
            if not stopped:  # hold back the longest tail that could still grow into a stop string:
                if k == len(s):  # the longest prefix of s, shorter than s, that the unsent text ends in
                    k = border[k - 1] if k else 0
                while k > len(self.text) - self.sent:
                    k = border[k - 1]
                end = min(end, len(self.text) - k)
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out, stopped


def _borders(s: str) -> list[int]:
    """KMP's failure table: border[i] is the length of the longest proper prefix of s[:i + 1]
    that is also its suffix."""
    border, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = border[k - 1]
        k += s[i] == s[k]
        border[i] = k
    return border


@dataclass(eq=False)
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[list], None]  # takes a step's (request, Output or exception) pairs (see `submit`)
    queue: Outputs | None  # `open`'s, filled on its event loop by its sink
    stream: _TextStream
    gen: torch.Generator | None
    row: int | None = None  # slot while running
    pos: int = 0  # tokens in the cache: the position the next fed token takes
    next_token: int = 0  # the last sampled token, fed at the next decode step
    n_out: int = 0
    cancelled: bool = False  # set on the event loop when the consumer goes away
    finished: bool = False
    ended: bool = False  # its last item (the Output with a finish_reason, or an exception) is emitted
    prompt_logprobs: list | None = field(default=None, repr=False)


class Engine:
    """Continuous batching over one model (see the module docstring)."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 16, max_seq_len: int | None = None,
                 device: str = "cpu", prefill_tokens_per_step: int = 512, fixed_shapes: bool = False,
                 compile: bool = False):
        """`prefill_tokens_per_step`: prompt tokens prefilled in one step, over all new
        requests; a longer prompt goes in chunks over several steps. It bounds how long the
        running rows wait for newcomers (the default's reason: `ServeConfig`). `fixed_shapes`: every decode step over all slots and all key
        positions (for CUDA graphs). `compile`: torch.compile the decode step with
        mode="reduce-overhead" (CUDA graphs on a GPU) and the prefill forward over dynamic
        shapes (`_prefill_forward`), both compiled here before any request; implies
        fixed_shapes. Tested on CPU (tokens and logprobs equal to `generate`); not yet run on
        a GPU."""
        limit = model.cfg.max_seq_len
        max_seq_len = max_seq_len or limit
        if not 1 <= max_seq_len <= limit:
            raise ValueError(f"max_seq_len={max_seq_len}: expected 1..{limit} (the model's context)")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: expected >= 1")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        if not _is_int(prefill_tokens_per_step) or prefill_tokens_per_step < 1:
            raise ValueError(f"prefill_tokens_per_step={prefill_tokens_per_step!r}: expected an integer >= 1")
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.fixed_shapes = fixed_shapes or compile
        self.meta: dict = {}
        cfg, w = model.cfg, model.tok_embeddings.weight
        # Compiled, one more slot than the batch: the scratch row that pads a prefill of one
        # request to two rows (see `_prefill_forward`).
        self._scratch = max_batch_size if compile else None
        self._caches = [SlotCache(max_batch_size + bool(compile), cfg.kv_heads, max_seq_len, cfg.head_dim,
                                  w.dtype, self.device) for _ in range(cfg.n_layers)]
        self._decode_fn = _decode_logits
        self._prefill_fn = None
        if compile:
            self._decode_fn = torch.compile(_decode_logits, mode="reduce-overhead", fullgraph=True, dynamic=False)
            self._prefill_fn = torch.compile(_prefill_hidden, fullgraph=True, dynamic=True)
            self._warm_up()
        self._rows: list[_Request] = []  # running requests; index = slot
        self._waiting: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._next_id = 0
        self.steps = 0
        self.tokens_generated = 0
        self.prefills_within_decode = 0  # prefill forwards run between a decode step's layers
        self._freed_at: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._prefilling: list[_Request] = []  # in a slot, prompt not yet whole in the cache; arrival order
        self._outbox: dict[Callable, list] = {}  # this step's outputs, by sink
        self._loop_sinks: dict[asyncio.AbstractEventLoop, Callable] = {}  # `generate`'s, one per event loop
        self.step_done: Callable[[], None] | None = None  # called on the engine thread after each step
        self._thread = threading.Thread(target=self._run, name="raylm-engine", daemon=True)
        self._thread.start()

    def _warm_up(self) -> None:
        """Compile both forwards now, not at the first request (tens of seconds on a CPU for
        a tiny model), in inference mode as on the engine thread: the fixed-shape decode step over
        dummy tokens at position 0 of every slot, which is what idle slots are fed anyway, and
        the prefill over a dummy row in the (still empty) slot 0, padded with the scratch
        slot; any later prefill overwrites those keys before it reads them."""
        n = self.max_batch_size
        with torch.inference_mode():  # tensors made here are inference tensors, as the steps' are (a guard)
            x = torch.zeros((n, 1), dtype=torch.long, device=self.device)
            pos = torch.zeros(n, dtype=torch.long, device=self.device)
            self._window(slice(0, n), self.max_seq_len)
            for _ in range(3):  # CUDA graphs are recorded on a later call than the first
                if self.device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()
                self._decode_fn(self.model, x, self._caches, pos)
            if self.max_seq_len >= 3:  # 2 rows of 3 tokens: sizes that are equal trace as one symbol
                zero = torch.zeros(1, dtype=torch.long)
                self._prefill_forward(torch.zeros((1, 3), dtype=torch.long), zero, zero)

    @classmethod
    def from_run(cls, uri: str, s3=None, *, device="cpu", dtype=None, **kw) -> Engine:
        """An engine over a run or checkpoint directory, local or s3:// (weights only)."""
        from raylm.generate import load_for_inference

        model, tok, meta = load_for_inference(uri, s3, device=device, dtype=dtype)
        engine = cls(model, tok, device=device, **kw)
        engine.meta = meta
        return engine

    # ------------------------------------------------------------------ the event-loop side

    @property
    def vocab_size(self) -> int:
        """The ids a request may hold and the engine samples, scores and reports: the
        tokenizer's, where the model's vocabulary is padded past it (rounded up to a multiple
        of 64): the padding rows have no text, and `raylm generate` never samples them."""
        return min(self.tokenizer.vocab_size, self.model.cfg.vocab_size)

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """What `generate` checks before queuing, for callers that answer 400 before
        streaming: ValueError naming the field."""
        check_request(prompt_ids, params, self.vocab_size, self.max_seq_len)

    def open(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> Outputs:
        """Queue a request now, from the event loop, and return its Outputs (closing them
        frees its slot within one step). Raises ValueError (`check`) or EngineClosed."""
        loop = asyncio.get_running_loop()
        sink = self._loop_sinks.get(loop)
        if sink is None:
            for old in [l for l in list(self._loop_sinks) if l.is_closed()]:  # each holds its loop
                self._loop_sinks.pop(old, None)
            sink = self._loop_sinks[loop] = functools.partial(loop.call_soon_threadsafe, _put_all)
        def release(ended: bool) -> None:
            if not req.finished:
                self.cancel(req)

        outputs = Outputs(release)
        req = self.submit(prompt_ids, params, sink, request_id, outputs)
        return outputs

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 request_id: str | None = None) -> AsyncIterator[Output]:
        """Stream a request's Outputs, the last with its finish_reason (`open`, queued at the
        first read). Closing this generator (aclose) or cancelling the task consuming it frees
        the request's slot within one step."""
        return read_lazily(functools.partial(self.open, prompt_ids, params, request_id))

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, sink: Callable[[list], None],
               request_id: str | None = None, queue: Outputs | None = None) -> _Request:
        """Queue a request whose outputs go to `sink`, from any thread: at the end of each
        prefill and each step the engine thread calls every sink that has something with one
        list of (request, Output or exception) pairs, in order (so one wake-up per consumer
        per step: `generate`'s sink puts them on its event loop, raylm.serve.engine_process's
        sends them to another process). An exception ends the request. Raises ValueError
        (`check`) or EngineClosed; `cancel` frees its slot within one step."""
        self.check(prompt_ids, params)
        gen = None
        if params.temperature > 0:
            gen = torch.Generator(device=self.device)
            if params.seed is None:
                gen.seed()
            else:
                gen.manual_seed(params.seed)
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is shutting down; not accepting requests")
            if request_id is None:
                request_id = f"req-{self._next_id}"
            self._next_id += 1
            req = _Request(request_id, list(prompt_ids), params, sink, queue,
                           _TextStream(self._decode_text, params.stop), gen)
            self._waiting.append(req)
            self._cond.notify()
        return req

    def cancel(self, req: _Request) -> None:
        """The request's consumer went away: its slot is freed at the next step (any thread)."""
        req.cancelled = True
        with self._cond:
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            running = len(self._rows)
            return {"running": running, "waiting": len(self._waiting),
                    "free_slots": self.max_batch_size - running, "steps": self.steps,
                    "tokens_generated": self.tokens_generated,
                    "prefills_within_decode": self.prefills_within_decode}

    def alive(self) -> bool:
        """Whether the engine thread runs: it ends once `close` has let every request finish, or
        on an error that failing the running requests did not survive (`_abandon`)."""
        return self._thread.is_alive()

    def freed_at_step(self, request_id: str) -> int | None:
        """The value of `steps` when the request's slot was freed (recent requests only): how
        tests and diagnostics see that an abandoned request left within one step."""
        with self._cond:
            return self._freed_at.get(request_id)

    async def close(self) -> None:
        """Stop admitting, finish every request already submitted, stop the engine thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        await asyncio.get_running_loop().run_in_executor(None, self.close_sync)

    def close_sync(self) -> None:
        """`close` for a caller with no event loop: blocks until every request has finished."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        # Inference mode, not only no_grad: torch then skips autograd's per-tensor bookkeeping
        # (version counters, view tracking) as well, which for a small model's few hundred
        # small ops a step is much of the step (tiny model, 16 rows, one CPU thread: 4.7-4.8k
        # against 6.0-6.3k output tokens/s in-process, two alternating pairs).
        with torch.inference_mode():
            try:
                self._loop()
            except BaseException as e:  # not even failing the running requests worked: see `_abandon`
                self._abandon(e)
                raise

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._rows and not self._closing:
                    self._cond.wait()
                if self._closing and not self._waiting and not self._rows:
                    return
            try:
                self._step()
            except Exception as e:  # a bug or out of memory: fail what is in flight, keep serving
                self._fail_running(e)
            self._deliver()
            if self.step_done is not None:
                self.step_done()

    def _step(self) -> None:
        for req in [r for r in self._rows if r.cancelled]:
            self._free(req)
        used = self._admit_and_prefill()
        if any(r.pos >= len(r.prompt) for r in self._rows):
            self._decode(self.prefill_tokens_per_step - used)
        with self._cond:
            self.steps += 1

    def _admit(self) -> None:
        """Every waiting request that a free slot can take joins now, whatever its length:
        its prompt enters the cache over the next steps, within the prefill budget."""
        with self._cond:
            while self._waiting and len(self._rows) < self.max_batch_size:
                req = self._waiting.popleft()
                if req.cancelled:
                    self._freed_at[req.id] = self.steps
                    continue
                req.row = len(self._rows)
                self._rows.append(req)
                self._prefilling.append(req)

    def _admit_and_prefill(self, first_slot: int = 0, budget: int | None = None) -> int:
        """Admit the waiting requests, prefill this step's chunks of the prompts in slots
        `first_slot` and up (`_schedule_prefill`, within `budget`, default
        `prefill_tokens_per_step`), and send the first tokens of those now whole at once, not
        after the decode step. Returns the prompt tokens prefilled."""
        self._admit()
        pending = [r for r in self._prefilling if r.row >= first_slot and not r.cancelled]
        chunks = self._schedule_prefill(pending, self.prefill_tokens_per_step if budget is None else budget)
        if chunks:
            self._prefill(chunks)
            self._deliver()
        return sum(n for _, n in chunks)

    def _schedule_prefill(self, pending: list[_Request], budget: int) -> list[tuple[_Request, int]]:
        """Prompt chunks, (request, tokens), at most `budget` in all. Each prompt of `pending`
        (being prefilled, in arrival order) first gets up to an equal share of the budget (so a
        short prompt queued behind a long one is done in one step, and a long one still
        advances every step), then what is left goes to them in arrival order."""
        left = budget
        if not pending or left < 1:
            return []
        take = {}
        share = max(1, left // len(pending))
        for r in pending:
            take[r] = min(len(r.prompt) - r.pos, share, left)
            left -= take[r]
        for r in pending:
            more = min(len(r.prompt) - r.pos - take[r], left)
            take[r] += more
            left -= more
        return [(r, n) for r, n in take.items() if n > 0]

    def _window(self, rows: slice | torch.Tensor, keys: int) -> None:
        for c in self._caches:
            c.rows, c.keys = rows, keys

    def _prefill_groups(self, chunks: list[tuple[_Request, int]]) -> list[list[tuple[_Request, int]]]:
        """Chunks batched into forwards of padded rows: longest first, a chunk joins the current
        forward while padding stays under half of its tokens and every row's padded positions
        stay inside the cache (a row's positions run from its `pos` to `pos` + the longest chunk)."""
        groups: list[list[tuple[_Request, int]]] = []
        for req, n in sorted(chunks, key=lambda c: -c[1]):
            if groups:
                g = groups[-1]
                T, real = g[0][1], sum(m for _, m in g)
                if (len(g) + 1) * T <= 2 * (real + n) and req.pos + T <= self.max_seq_len:
                    g.append((req, n))
                    continue
            groups.append([(req, n)])
        return groups

    def _prefill(self, chunks: list[tuple[_Request, int]]) -> None:
        """Feed each chunk's prompt tokens into its slot; a request whose prompt is now whole
        samples its first token from the logits at its last prompt position."""
        done = []
        for group in self._prefill_groups(chunks):
            T = group[0][1]
            tokens = torch.zeros((len(group), T), dtype=torch.long)
            for i, (req, n) in enumerate(group):
                tokens[i, :n] = torch.tensor(req.prompt[req.pos:req.pos + n])
            start = torch.tensor([req.pos for req, _ in group])
            rows = torch.tensor([req.row for req, _ in group])
            # Rows padded past their chunk write keys beyond their own length: never visible
            # (a row sees slots up to its query's position) and overwritten before they are.
            h = self._prefill_forward(tokens, start, rows)
            last = [n - 1 for _, n in group]
            for i, (req, n) in enumerate(group):
                if req.params.echo:
                    logits = self._logits(h[i, :n])  # (n, vocab): every prompt token's prediction
                    self._add_prompt_logprobs(req, logits)
                    if req.pos + n == len(req.prompt):
                        done.append((req, logits[-1]))
            ends = [i for i, (req, n) in enumerate(group) if req.pos + n == len(req.prompt) and not req.params.echo]
            if ends:
                logits = self._logits(h[ends, [last[i] for i in ends]])
                done += [(group[i][0], logits[j]) for j, i in enumerate(ends)]
            for req, n in group:  # all before any request ends: compaction moves a row's keys up to its pos
                req.pos += n
        for req, logits in done:
            self._prefilling.remove(req)
            if req.params.max_tokens == 0:
                self._finish(req, Output([], "", None, req.prompt_logprobs, "length", len(req.prompt), 0))
            else:
                self._accept(req, logits)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """The logits of hidden states h (..., dim) over the tokenizer's ids only (`vocab_size`):
        what every token is sampled from and every logprob normalised over, as in `generate`."""
        return self.model.logits(h)[..., :self.vocab_size]

    def _prefill_forward(self, tokens: torch.Tensor, start: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, dim) of prompt chunks `tokens` (B, T), row b from position
        start[b] into slot rows[b] (CPU tensors).

        Eager: over the keys up to the furthest position written. Compiled: one graph for
        every shape (dynamic=True), over every key position as for decode, with B and T at
        least 2 (torch.compile specialises sizes 0 and 1, so a lone request or a one-token
        chunk would each cost another graph): a lone row is padded with a dummy row in the
        scratch slot, a one-token chunk with a dummy token after it, whose key lands past the
        row's length (never visible, overwritten before it is, as the padding of shorter
        chunks in a group). A one-token chunk at the last position has no room for that
        and runs eager."""
        B, T = tokens.shape
        end = int(start.max()) + T
        if self._prefill_fn is None or (T < 2 and end + 1 > self.max_seq_len):
            self._window(rows.to(self.device), end)
            return self.model.hidden_states(tokens.to(self.device), self._caches, start.to(self.device))
        if T < 2:
            tokens = torch.cat([tokens, torch.zeros_like(tokens)], 1)
        if B < 2:
            tokens = torch.cat([tokens, torch.zeros_like(tokens)])
            start, rows = torch.cat([start, start.new_zeros(1)]), torch.cat([rows, rows.new_tensor([self._scratch])])
        self._window(rows.to(self.device), self.max_seq_len)
        h = self._prefill_fn(self.model, tokens.to(self.device), self._caches, start.to(self.device))
        return h[:B, :T]

    def _decode(self, budget: int) -> None:
        """One token for every row whose prompt is whole; rows still being prefilled ride along
        as dummies at their next prompt position, which their next chunk overwrites.

        Without fixed shapes (whose decode reads every slot), between two of its layers the
        requests that arrived meanwhile are admitted, those admitted since the step began
        (slots n and up, which it does not read; older ones still prefilling ride along in it
        as dummies, so they wait for the next step) are prefilled within `budget` (what the
        step's own prefill left, so the running rows still wait for at most one budget's
        prefill a step), and their first tokens sent at once: a newcomer waits for the layer
        in progress, not for the whole step and the next step's prefill behind it. One that
        ends at its first token frees its slot, and compaction then moves only slots n and up."""
        rows = list(self._rows)
        ready = [r.pos >= len(r.prompt) for r in rows]
        tokens = [r.next_token if ok else 0 for r, ok in zip(rows, ready)]
        positions = [r.pos for r in rows]
        if self.fixed_shapes:
            pad = self.max_batch_size - len(rows)
            tokens, positions = tokens + [0] * pad, positions + [0] * pad  # idle slots: harmless dummies
            self._window(slice(0, self.max_batch_size), self.max_seq_len)
        else:
            window = (slice(0, len(rows)), max(positions) + 1)
            self._window(*window)
        x = torch.tensor(tokens, device=self.device)[:, None]
        pos = torch.tensor(positions, device=self.device)
        if self._decode_fn is not _decode_logits and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        if self.fixed_shapes:
            logits = self._decode_fn(self.model, x, self._caches, pos)
        else:
            def newcomers():
                nonlocal budget
                if self._waiting and len(self._rows) < self.max_batch_size and budget > 0:
                    used = self._admit_and_prefill(len(rows), budget)
                    if used:
                        budget -= used
                        self.prefills_within_decode += 1  # written by the engine thread only
                        self._window(*window)  # the prefill set its own
            logits = self._decode_fn(self.model, x, self._caches, pos, newcomers)
        logits = logits[:, :self.vocab_size]  # as `_logits`
        # Greedy rows in one call (sample_token's greedy choice is this argmax, row by row).
        greedy = logits.argmax(-1).tolist() if any(r.params.temperature == 0 for r in rows) else None
        rows = [(i, r) for i, (r, ok) in enumerate(zip(rows, ready)) if ok]
        for _, req in rows:  # all before any request ends: compaction moves a row's keys up to its pos
            req.pos += 1
        for i, req in rows:
            self._accept(req, logits[i], greedy[i] if greedy and req.params.temperature == 0 else None)

    def _accept(self, req: _Request, logits: torch.Tensor, token: int | None = None) -> None:
        """Sample the request's next token from its logits (vocab,) unless `token` is given,
        stream it, and end the request when it hits a stop token, a stop string or max_tokens.
        What fails here is the request's own (its sampling, its text): it fails alone, and the
        others in the batch go on."""
        try:
            self._take(req, logits, token)
        except Exception as e:  # noqa: BLE001 - its consumer re-raises it, with its traceback
            if req.finished:  # it failed after its end: not the request's own doing
                raise
            self._fail(req, e, "the request's sampling failed")

    def _take(self, req: _Request, logits: torch.Tensor, token: int | None) -> None:
        p = req.params
        if token is None:
            token = sample_token(logits, p.temperature, p.top_k, req.gen, p.top_p)
        prompt_lp, req.prompt_logprobs = req.prompt_logprobs, None
        if token in p.stop_token_ids:
            self._finish(req, Output([], req.stream.flush(), [] if p.logprobs is not None else None,
                                     prompt_lp, "stop", len(req.prompt), req.n_out))
            return
        req.n_out += 1
        self.tokens_generated += 1  # written by the engine thread only
        lps = None
        if p.logprobs is not None:
            lp = torch.log_softmax(logits.float(), -1)
            lps = [self._token_logprob(lp, token, p.logprobs)]
        text, stopped = req.stream.push(token)
        reason = "stop" if stopped else "length" if req.n_out == p.max_tokens else None
        if reason == "length":
            text += req.stream.flush()
        out = Output([token], text, lps, prompt_lp, reason, len(req.prompt), req.n_out)
        if reason is None:
            req.next_token = token
            self._emit(req, out)
        else:
            self._finish(req, out)

    def _finish(self, req: _Request, out: Output) -> None:
        req.finished = True  # before the consumer can see the last Output
        self._free(req)
        self._emit(req, out)

    def _free(self, req: _Request) -> None:
        """Release the request's slot; the last running request moves into it (compaction)."""
        with self._cond:
            last = len(self._rows) - 1
            if req.row is not None:
                if req.row != last:
                    moved = self._rows[last]
                    for c in self._caches:
                        c.move(last, req.row, moved.pos)
                    self._rows[req.row], moved.row = moved, req.row
                self._rows.pop()
                req.row = None
            if req in self._prefilling:
                self._prefilling.remove(req)
            self._freed_at[req.id] = self.steps
            while len(self._freed_at) > 1024:
                self._freed_at.popitem(last=False)

    def _emit(self, req: _Request, item) -> None:
        if isinstance(item, BaseException) or item.finish_reason is not None:
            req.ended = True
        self._outbox.setdefault(req.sink, []).append((req, item))

    def _deliver(self) -> None:
        """Hand the step's outputs to their sinks, one call per sink per step (for an event
        loop a call is a write to its self-pipe: per output, it cost more than the step)."""
        outbox, self._outbox = self._outbox, {}
        for sink, items in outbox.items():
            try:
                sink(items)
            except (RuntimeError, OSError):  # the consumers' event loop is closed, or their pipe: nobody is listening
                for req, _ in items:
                    req.cancelled = True

    def _fail_running(self, error: Exception) -> None:
        for req in list(self._rows):
            self._fail(req, error, "engine step failed")

    def _fail(self, req: _Request, error: Exception, what: str) -> None:
        req.finished = True
        failure = RuntimeError(f"{what}: {error!r}")
        failure.__cause__ = error
        self._emit(req, failure)  # first: if freeing its slot fails too, its consumer still hears why
        self._free(req)

    def _abandon(self, error: BaseException) -> None:
        """The engine thread is ending on an exception that failing the running requests did not
        survive (a device that fails every op since, freeing a slot included), or that came
        from outside a step. Every request still running or waiting ends now with
        EngineClosed (the app's 503, retry elsewhere) instead of waiting forever for a thread
        that is gone, and new ones are refused (`alive()` is False: a replica's health check
        replaces it)."""
        with self._cond:
            self._closing = True
            left = [r for r in (*self._rows, *self._waiting) if not r.ended]
            self._rows.clear()
            self._waiting.clear()
            self._prefilling.clear()
        for req in left:
            req.finished = True
            failure = EngineClosed(f"the engine stopped on an error it could not recover from: {error!r}")
            failure.__cause__ = error
            self._emit(req, failure)
        try:
            self._deliver()
        except Exception:  # noqa: BLE001 - a sink that fails now cannot be helped; the error is re-raised
            pass

    # ------------------------------------------------------------------ text and logprobs

    def _decode_text(self, ids: list[int]) -> str:
        # The model's vocabulary may be padded past the tokenizer's; such ids have no text.
        n = self.tokenizer.vocab_size
        return self.tokenizer.decode([i for i in ids if i < n])

    def token_text(self, token_id: int) -> str:
        """A token's own text, for logprobs: its piece with SentencePiece's "▁" as a space."""
        if token_id >= self.tokenizer.vocab_size:
            return ""
        return self.tokenizer.id_to_piece(token_id).replace("\u2581", " ")

    def _token_logprob(self, logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
        top = []
        if k:
            values, ids = torch.topk(logprobs, min(k, logprobs.numel()))
            top = [(self.token_text(i), v) for i, v in zip(ids.tolist(), values.tolist())]
        return TokenLogprob(token, self.token_text(token), float(logprobs[token]), top)

    def _add_prompt_logprobs(self, req: _Request, logits: torch.Tensor) -> None:
        """Echo: the logprobs of the prompt tokens that this chunk's logits (n, vocab) predict;
        row i, at position req.pos + i, predicts prompt token req.pos + i + 1."""
        lp = torch.log_softmax(logits.float(), -1)
        k = req.params.logprobs or 0
        if req.prompt_logprobs is None:
            req.prompt_logprobs = [None]  # the first token has no context to be predicted from
        end = min(req.pos + len(lp), len(req.prompt) - 1)
        req.prompt_logprobs += [self._token_logprob(lp[i - req.pos], req.prompt[i + 1], k)
                                for i in range(req.pos, end)]


def _put_all(items) -> None:
    for req, item in items:
        req.queue.put_nowait(item)


def _prefill_hidden(model, tokens: torch.Tensor, caches, start: torch.Tensor) -> torch.Tensor:
    """(B, T, dim) hidden states of one prefill forward: what `Engine(compile=True)` compiles."""
    return model.hidden_states(tokens, caches, start)


def _decode_logits(model, tokens: torch.Tensor, caches, positions: torch.Tensor,
                   between_layers: Callable[[], None] | None = None) -> torch.Tensor:
    """(B, vocab) logits of one decode step: row b feeds tokens[b] at positions[b]."""
    return model.logits(model.hidden_states(tokens, caches, positions, between_layers=between_layers)[:, -1])
