"""The OpenAI API's request and response bodies, as the official `openai` client sends and reads them.

Requests are strict where OpenAI's API is: an unknown field is an error naming it, not a
silently ignored typo, and so is a value of the wrong JSON type ("2" or 2.0 for an integer,
"false" or 0 for a boolean), not a value converted. Errors leave in OpenAI's body shape, `{"error": {"message", "type",
"param", "code"}}`, with `param` naming the field, so clients show the cause.
`top_k` is an extension (vLLM has it too); the OpenAI fields raylm cannot honour
(penalties, logit_bias) are accepted only at their no-op values; fields it has no part of
(tools, tool_choice, response_format, ...) are unknown fields.
"""

from __future__ import annotations

import codecs
import json
import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raylm.documents import encodable

MAX_STOP = 4  # OpenAI's own limit on stop sequences
MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs
MAX_SEED = 2**63 - 1


class APIError(Exception):
    """A request the server refuses: HTTP status, message, the field at fault, OpenAI's type."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    # strict: JSON types as OpenAI's API takes them. Lax pydantic turned "2" into 2, 2.0 and
    # true into ints, and "false", 0 or "off" into booleans; OpenAI answers 400 to each. A
    # number field still takes a JSON integer (temperature: 1).
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage (so far) on every chunk, and at the end
    # OpenAI's: random padding on each chunk; raylm adds none, so only its no-op value, false.
    include_obfuscation: bool = False

    @model_validator(mode="after")
    def _no_obfuscation(self):
        if self.include_obfuscation:
            raise _field_error("stream_options.include_obfuscation",
                               "not supported by this server; omit it or send false")
        return self


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: str
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)  # 0: only the most likely token (greedy), as OpenAI's API takes it
    top_k: int | None = Field(None, ge=-1)  # extension; 0 or -1: off
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-MAX_SEED - 1, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None

    @field_validator("n", "stream", "echo", "logprobs", mode="before", check_fields=False)
    @classmethod
    def _null_is_default(cls, v, info):
        """null where OpenAI's API allows it (every optional field it marks nullable): the
        default. The fields typed `X | None` here take it as it is."""
        return cls.model_fields[info.field_name].default if v is None else v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise _field_error(name, "not supported by this server; omit it or send 0")
        if self.logit_bias and any(self.logit_bias.values()):  # every bias 0: its no-op value
            raise _field_error("logit_bias", "not supported by this server; omit it or send biases of 0")
        if self.stream_options is not None and not self.stream:
            raise _field_error("stream_options", "only allowed when stream is true")
        return self

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and (self.stream_options.include_usage
                                             or self.stream_options.continuous_usage_stats))

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_form(cls, v, handler):
        """One message for a prompt of none of the four forms: pydantic's first error is the
        string branch's ("should be a valid string") even for a list of token ids like [1.0, 2]."""
        try:
            return handler(v)
        except ValidationError:
            got = json.dumps(v)[:80] if _jsonable(v) else type(v).__name__
            raise _field_error("prompt", "must be a string, a list of strings, a list of token ids (integers) "
                                         f"or a list of token-id lists (got {got})") from None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("must not be empty")
        if isinstance(v, list) and isinstance(v[0], list) and any(not p for p in v):
            raise ValueError("token lists must not be empty")
        return v

    @model_validator(mode="after")
    def _completion_only(self):
        if self.suffix:
            raise _field_error("suffix", "not supported by this server; omit it")
        if self.best_of is not None and self.best_of != self.n:
            raise _field_error("best_of", "not supported by this server unless equal to n")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt as text or token ids: OpenAI's four prompt forms."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None
    # A reply sent back as the openai client dumps it (`message.model_dump()`) carries these
    # as null; taken when null, a 400 naming the field otherwise (no tools, no audio here).
    refusal: None = None
    tool_calls: None = None
    function_call: None = None
    audio: None = None
    annotations: None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _chat_only(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise _field_error("top_logprobs", "needs logprobs: true")
        return self

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat(self) -> list[dict]:
        """The messages as the tokenizer's chat template takes them; `developer` is the newer
        name of `system`."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class _FieldError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _field_error(field: str, message: str) -> _FieldError:
    return _FieldError(field, message)


# --------------------------------------------------------------------------- parsing


def parse_request(raw: bytes, model: type[BaseModel]):
    """The request body as `model`, or APIError(400) naming the field at fault."""
    try:
        data = json.loads(raw)
    except ValueError as e:  # not UTF-8, not JSON, or an integer too long to convert (Python's limit)
        raise APIError(400, f"request body is not valid JSON: {e}", None) from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", None) from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}", None)
    try:
        # A "\ud800" escape, or the same as raw bytes (json decodes them with surrogatepass):
        # JSON takes it, the tokenizer (and UTF-8) cannot. Only a body holding either is walked;
        # a UTF-16 or UTF-32 body (json detects and takes those too) hides both from the byte
        # search, so it is always walked.
        suspect = b"\\u" in raw or b"\xed" in raw or json.detect_encoding(raw) not in ("utf-8", "utf-8-sig")
        bad = _lone_surrogate(data) if suspect else None
        if bad is not None:
            raise APIError(400, f"{bad or 'request body'}: a string holds an unpaired UTF-16 surrogate "
                                "(not a character)", bad or None)
        return model.model_validate(data)
    except ValidationError as e:
        raise _api_error(e) from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", None) from None


def _lone_surrogate(data: Any) -> str | None:
    """The dotted path ("" for the whole body) of the first string, key or value, holding an
    unpaired surrogate, or None when every string is text."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, v = stack.pop()
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        for k, x in items:
            if isinstance(k, str) and not encodable(k):
                return path  # the key itself cannot be shown
            at = f"{path}.{k}" if path else str(k)
            if isinstance(x, str) and not encodable(x):
                return at
            stack.append((at, x))
    return ""


def _api_error(e: ValidationError) -> APIError:
    err = _most_telling(e.errors(include_url=False))
    ctx_err = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_err, _FieldError):
        return APIError(400, str(ctx_err), ctx_err.field)
    # A union (prompt: str | list[...]) puts the branch in the location; the field is what matters.
    loc = [str(p) for p in err["loc"][:-1] if not _union_tag(p)] + [str(p) for p in err["loc"][-1:]]
    if err["type"] != "extra_forbidden" and loc and _union_tag(loc[-1]):  # an unknown field's name is the client's
        loc.pop()
    param = ".".join(loc) or None
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        msg = "unknown field (not part of this API)"
    elif kind == "missing":
        msg = "required field missing"
    value = err.get("input")
    shown = "" if kind in ("missing", "extra_forbidden") else f" (got {json.dumps(value)[:80] if _jsonable(value) else type(value).__name__})"
    return APIError(400, f"{param}: {msg}{shown}", param)


def _most_telling(errors: list[dict]) -> dict:
    """The error to report. A list that fails a union (content: str | list[ContentPart],
    stop: str | list[str]) gets the string branch's error first, "should be a valid string",
    which says nothing of what is wrong; a list branch's error names the item and its fault
    (messages.0.content.0.type: should be 'text')."""
    first = errors[0]
    loc = first["loc"]
    if len(loc) >= 2 and _union_tag(loc[-1]) and isinstance(first.get("input"), list):
        at = len(loc) - 1  # where the branch's tag stands
        for err in errors[1:]:
            if (err["loc"][:at] == loc[:at] and len(err["loc"]) > at + 1
                    and str(err["loc"][at]).startswith("list[")):
                return err
    return first


def _union_tag(p: Any) -> bool:
    p = str(p)
    return "[" in p or p.startswith("function-") or p in {"str", "int", "float", "bool", "list", "dict"}


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")  # SentencePiece's byte-fallback pieces


def token_bytes(token: str) -> bytes:
    """A token's bytes: a byte piece's one byte ("<0xC3>", part of a character: the pieces of a
    character join back into it), any other token's text in UTF-8."""
    m = _BYTE_PIECE.fullmatch(token)
    return bytes([int(m.group(1), 16)]) if m else token.encode("utf-8")


class TextOffsets:
    """A choice's text_offset as its tokens go by, also across a stream's chunks: the
    characters that the tokens before one completed (the byte pieces of one character add one
    character, with the last of them, whichever chunk that is in). `texts`: the text in the
    answer of the tokens whose piece is not it, by id (`own_texts`: a control token such as
    "<|bos|>" decodes to nothing, "<unk>" to " ⁇ "); counted by its piece, every later
    offset was that much too far."""

    def __init__(self, start: int = 0, texts: dict[int, str] | None = None):
        self.chars = start
        self.texts = texts or {}
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def take(self, token: str, token_id: int | None = None) -> int:
        """The next token's text_offset; its text then counts."""
        at = self.chars
        own = self.texts.get(token_id) if token_id is not None else None
        self.chars += len(self._text.decode(token_bytes(token) if own is None else own.encode("utf-8")))
        return at


def own_texts(tok) -> dict[int, str]:
    """The ids whose text in a decoded answer is not their piece (with "▁" as a space), and
    that text (`TextOffsets`); byte pieces are read as their byte."""
    out = {}
    for i in range(tok.vocab_size):
        piece = tok.id_to_piece(i)
        if _BYTE_PIECE.fullmatch(piece) is None:
            text = tok.decode([i])
            if text != piece.replace("\u2581", " "):
                out[i] = text
    return out


def completion_logprobs(entries: list, offsets: int | TextOffsets = 0) -> dict:
    """OpenAI's legacy completions logprobs: parallel lists over `entries` (TokenLogprob-like;
    an echoed prompt's first token has logprob None, as in OpenAI's answers). Each position's
    top_logprobs holds the k most likely tokens and, where it is not among them, the token
    itself (OpenAI: "up to logprobs+1 elements"; chat's top_logprobs stay k). text_offset
    counts from `offsets`: a number, or a `TextOffsets` (a stream's goes on counting)."""
    if not isinstance(offsets, TextOffsets):
        offsets = TextOffsets(offsets)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [_top_with_token(e) if e.logprob is not None else None for e in entries],
            "text_offset": [offsets.take(e.token, getattr(e, "token_id", None)) for e in entries]}


def _top_with_token(e) -> dict:
    top = dict(e.top)
    top.setdefault(e.token, e.logprob)  # not among the k most likely: at most as likely as any of them, so last
    return top


def chat_logprobs(entries: list) -> dict:
    def item(token: str, lp: float) -> dict:
        return {"token": token, "logprob": lp, "bytes": list(token_bytes(token))}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
