"""The one model the server holds, and the single thread that runs every generation on it.

MLX arrays and our models are not safe to use from several threads at once, and the active
adapters are state on the shared base: so one worker thread owns the model (it loads it too)
and runs the requests one at a time, in the order they arrived. Each request gets an asyncio
queue the worker feeds text pieces into; a client that goes away sets a flag the worker checks
between tokens, so an abandoned request frees the model at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx

from ..adapters.mix import load_adapters, set_active
from ..errors import OndeviceLoraError
from ..generation.generate import TextStream, encode_prompt
from .schema import APIError, CompletionRequest


class StopMatcher:
    """Cuts a stream of text pieces at the first of the `stops` strings (which is dropped).

    Text that could be the start of a stop string is held back until the next piece shows
    whether it is one, so a streamed answer never shows part of a stop string.
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        self.pending += piece
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            text, self.pending = self.pending[: min(found)], ""
            return text, True
        # Keep the longest tail that is a proper prefix of some stop string.
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(stop[:n]):
                    hold = n
                    break
        cut = len(self.pending) - hold
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text, False

    def finish(self) -> str:
        text, self.pending = self.pending, ""
        return text


@dataclasses.dataclass
class Finished:
    """The last event of a generation."""

    finish_reason: str  # "stop" (end of sequence or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int


class _Job:
    """One request's channel from the worker thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class Engine:
    """The base model, its adapters by served name, and the worker thread.

    models: {served id: adapter name, or None for the base model alone}.
    """

    def __init__(self, load, base_id: str, adapters: dict[str, str]):
        if base_id in adapters:
            raise OndeviceLoraError(
                f"adapter name {base_id!r} is also the base model's id; name the adapter "
                "differently (--adapter NAME=FOLDER)."
            )
        self.models = {base_id: None, **{name: name for name in adapters}}
        # One thread, so every MLX call (loading included) happens on it, one job at a time.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ondevice-lora-gen")
        self._closing = threading.Event()
        self.model, self.tokenizer = self._worker.submit(self._load, load, adapters).result()

    @staticmethod
    def _load(load, adapters):
        model, tokenizer = load()
        if adapters:
            load_adapters(model, adapters, tokenizer)
        return model, tokenizer

    def close(self) -> None:
        """Drop the waiting requests, finish the running one's current token, stop the thread."""
        self._closing.set()
        # MLX wants each thread that used it to free its streams before it ends; without this
        # the process aborts at exit ("terminate called without an active exception").
        self._worker.submit(mx.clear_streams)
        self._worker.shutdown(wait=True)

    def prompt_ids(self, request: CompletionRequest) -> list[int]:
        """The request's prompt as token ids; raises APIError (400) for an unknown model or a
        prompt the chat template refuses."""
        if request.model not in self.models:
            raise APIError(
                404,
                f"the model {request.model!r} does not exist; this server has "
                f"{', '.join(map(repr, self.models))} (GET /v1/models lists them).",
                param="model",
                code="model_not_found",
            )
        if isinstance(request.prompt, list) and request.prompt and not request.chat:
            vocab = self.tokenizer.vocab_size
            if max(request.prompt) >= vocab:
                raise APIError(400, f"prompt token ids must be below {vocab}", param="prompt")
            return request.prompt
        try:
            ids = encode_prompt(self.tokenizer, request.prompt, chat=request.chat)
        except OndeviceLoraError as e:
            raise APIError(400, str(e), param="messages" if request.chat else "prompt") from None
        if not ids:
            raise APIError(400, "the prompt encodes to no tokens", param="prompt")
        return ids

    async def generate(self, request: CompletionRequest, ids: list[int]) -> AsyncIterator:
        """Queue the request; yield its text pieces, then one Finished."""
        job = _Job(asyncio.get_running_loop())
        self._worker.submit(self._run, request, ids, job)
        try:
            while True:
                event = await job.queue.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            job.cancelled.set()  # the client left early (or we are done): stop generating

    def _run(self, request: CompletionRequest, ids: list[int], job: _Job) -> None:
        if self._closing.is_set():
            job.emit(APIError(503, "the server is shutting down", type="server_error"))
            return
        if job.cancelled.is_set():
            return
        try:
            adapter = self.models[request.model]
            if len(self.models) > 1:
                set_active(self.model, adapter)
            stream = TextStream(self.model, self.tokenizer, ids, request.sampling)
            matcher = StopMatcher(request.stop)
            reason = None
            for piece in stream:
                if job.cancelled.is_set() or self._closing.is_set():
                    return
                text, stopped = matcher.feed(piece)
                if text:
                    job.emit(text)
                if stopped:
                    reason = "stop"
                    break
            if reason is None:
                if rest := matcher.finish():
                    job.emit(rest)
                hit_limit = stream.stats.generation_tokens >= request.sampling.max_tokens
                reason = "length" if hit_limit else "stop"
            job.emit(Finished(reason, len(ids), stream.stats.generation_tokens))
        except Exception as e:  # a bug: reported to this request, the server keeps serving
            job.emit(e)
