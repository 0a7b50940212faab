"""The OpenAI API's request checks and response shapes, for /v1/chat/completions and
/v1/completions.

Requests are checked field by field before anything is queued; the first problem becomes an
APIError carrying OpenAI's error shape {"error": {"message", "type", "param", "code"}}, so
clients (the official openai package among them) raise their usual exceptions. Fields the API
has and we do not use (user, presence_penalty, ...) are ignored, as OpenAI-compatible servers do;
ones that would change the answer if ignored (n > 1, logprobs, echo) are refused.
"""

from __future__ import annotations

import dataclasses
import time
import uuid

from ..errors import OndeviceLoraError
from ..generation.generate import SamplingConfig

# The API allows at most this many stop sequences.
MAX_STOP = 4
# A request naming this model, or none, gets the base model.
DEFAULT_MODEL = "default"
# Seeds are 64-bit unsigned integers (mx.random.key).
SEED_LIMIT = 2**64


class APIError(Exception):
    """A request the server refuses, answered with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param=None, code=None, type=None, headers=None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}  # e.g. Retry-After on 503
        self.body = {
            "error": {
                "message": message,
                "type": type or ("invalid_request_error" if status < 500 else "server_error"),
                "param": param,
                "code": code,
            }
        }


@dataclasses.dataclass
class CompletionRequest:
    """One checked request: the prompt (chat messages or text) and how to answer it."""

    chat: bool  # /v1/chat/completions (messages) or /v1/completions (prompt)
    model: str
    prompt: list[dict] | str | list[int]
    sampling: SamplingConfig
    stop: list[str]
    stream: bool
    include_usage: bool


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bad(message: str, param: str, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _content_text(content, index: int) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise _bad(f"{param}: only text parts are supported, got {part!r:.100}", param)
            if not isinstance(part.get("text"), str):
                raise _bad(f"{param}: a text part needs a string 'text'", param)
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"{param} must be a string or a list of text parts, got {content!r:.100}", param)


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise _bad("'messages' is required: a list of {'role', 'content'}", "messages", None)
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of {'role', 'content'}", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
        out.append({"role": message["role"], "content": _content_text(message.get("content"), i)})
    return out


def _prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        return prompt  # token ids
    if prompt is None:
        raise _bad("'prompt' is required: a non-empty string", "prompt", None)
    raise _bad(
        f"'prompt' must be a non-empty string or a list of token ids, got {prompt!r:.100} "
        "(batches of several prompts are not supported: send one request each)",
        "prompt",
    )


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)):
        raise _bad(f"'stop' must be a string or a list of strings, got {stop!r:.100}", "stop")
    if len(stops) > MAX_STOP:
        raise _bad(f"'stop' takes at most {MAX_STOP} sequences, got {len(stops)}", "stop")
    return stops


def _sampling(body: dict, max_tokens_key: str) -> SamplingConfig:
    defaults = SamplingConfig()
    values = {
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "max_tokens": body.get(max_tokens_key, body.get("max_tokens")),
        "seed": body.get("seed"),
    }
    checks = {
        "temperature": _is_number,
        "top_p": _is_number,
        "max_tokens": _is_int,
        "seed": _is_int,
    }
    for key, value in values.items():
        if value is not None and not checks[key](value):
            kind = "an integer" if checks[key] is _is_int else "a number"
            raise _bad(f"'{key}' must be {kind}, got {value!r:.100}", key, "invalid_type")
    if values["seed"] is not None and not 0 <= values["seed"] < SEED_LIMIT:
        raise _bad(f"'seed' must be in [0, 2**64), got {values['seed']}", "seed")
    settings = {k: v for k, v in values.items() if v is not None}
    for key, value in settings.items():  # one at a time, to name the field that is wrong
        try:
            dataclasses.replace(defaults, **{key: value})
        except OndeviceLoraError as e:
            raise _bad(str(e), key) from None
    return dataclasses.replace(defaults, **settings)


def parse_request(body, chat: bool) -> CompletionRequest:
    """Check a decoded JSON body; raises APIError (400) naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model", DEFAULT_MODEL)
    if model is None:
        model = DEFAULT_MODEL
    if not isinstance(model, str) or not model:
        raise _bad(f"'model' must be a model id from /v1/models, got {model!r:.100}", "model")
    if body.get("n", 1) != 1:
        raise _bad("only n=1 is supported: send one request per completion", "n", "unsupported")
    for key in ("logprobs", "echo", "suffix", "tools", "top_logprobs", "logit_bias"):
        if body.get(key) not in (None, False, [], {}):
            raise _bad(f"'{key}' is not supported by this server", key, "unsupported")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise _bad(
            "only response_format {'type': 'text'} is supported", "response_format", "unsupported"
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad(f"'stream' must be true or false, got {stream!r:.100}", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
    if not isinstance(options.get("include_usage", False), bool):
        raise _bad(
            "'stream_options.include_usage' must be true or false",
            "stream_options.include_usage",
            "invalid_type",
        )
    return CompletionRequest(
        chat=chat,
        model=model,
        prompt=_messages(body) if chat else _prompt(body),
        sampling=_sampling(body, "max_completion_tokens" if chat else "max_tokens"),
        stop=_stop(body),
        stream=stream,
        include_usage=bool(options.get("include_usage")),
    )


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Responses:
    """The response bodies of one request: the whole answer, or its stream's chunks."""

    def __init__(self, request: CompletionRequest):
        self.chat = request.chat
        self.model = request.model
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"

    def _wrap(self, obj: str, choices: list, extra: dict | None = None) -> dict:
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        return {**body, "choices": choices, **(extra or {})}

    def complete(self, text: str, finish_reason: str, used: dict) -> dict:
        """The non-streamed answer."""
        choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return self._wrap(self.object, [choice], {"usage": used})

    def chunk(self, text: str | None, finish_reason: str | None = None, first=False) -> dict:
        """One streamed chunk: a piece of text, or (text None) the closing finish_reason."""
        choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
            return self._wrap("chat.completion.chunk", [choice])
        choice["text"] = text or ""
        return self._wrap("text_completion", [choice])

    def usage_chunk(self, used: dict) -> dict:
        """The last chunk when stream_options.include_usage is set: no choices, the usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._wrap(obj, [], {"usage": used})
