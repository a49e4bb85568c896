"""An OpenAI-compatible HTTP server around one loaded Engine.

``create_app(engine, model_id)`` builds the ASGI app: POST /v1/chat/completions and /v1/completions
(streamed as server-sent events or not), GET /v1/models and GET /health. llama.cpp contexts are not
thread-safe, so one worker thread owns the engine and takes requests from a queue: one at a time by
default, or, with ``parallel > 1``, requests that wait together run together as llama.cpp parallel
sequences (on the test models that gave about the same tokens/s as one at a time with 4 clients: see
scripts/bench_serve.py). A client that goes away cancels its request; the worker drops it before it
starts, or stops it at its next token. Errors are OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, and no request, however bad, stops the server.

Prompts are rendered and tokenized on the event loop (llama.cpp's tokenizer only reads the
vocabulary, as llama-server's HTTP threads do too), so a prompt that cannot fit is refused at once
with a 400, without waiting for the queue. Nothing here prints: uvicorn logs requests.

Chat requests go through the model's template with moelocal.formats (OpenAI ``tools``, assistant
``tool_calls``, ``role: "tool"`` results, ``reasoning_effort``), and answers come back taken apart
by the format's parser, as llama-server sends them: ``reasoning_content`` beside ``content``, and
``tool_calls`` with ``finish_reason: "tool_calls"`` (streamed as deltas of the same names).
``response_format`` constrains decoding with a grammar (moelocal.grammar).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import queue
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moelocal.engine import Chunk, Engine, SamplingParams
from moelocal.errors import MoelocalError, UsageError
from moelocal.formats import ChatFormat, Delta, Message, Parser

# Roles the chat endpoint passes to the model's template; "developer" is OpenAI's newer name for system.
ROLES = ("system", "developer", "user", "assistant", "tool")
# How long shutdown waits for the worker to leave llama.cpp; an engine still in use is not closed.
STOP_TIMEOUT = 10.0


class ApiError(Exception):
    """A request the server refuses: becomes an OpenAI-style error body with this status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- the worker: the only thread that touches the llama.cpp context ---------------------------


@dataclass(eq=False)
class Job:
    """One request on its way through the worker. The worker ``put``s chunks from its thread; the
    event loop reads them in ``batches``: all that arrived since it last looked, so a fast model
    costs one wake-up (and one write to the client) per batch rather than per token."""

    tokens: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    cancelled: threading.Event = field(default_factory=threading.Event)
    _items: deque = field(default_factory=deque)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _woken: bool = False  # a wake-up is on its way to the event loop

    def cancel(self) -> None:
        self.cancelled.set()

    def put(self, item: Chunk | BaseException | None) -> None:
        """From the worker thread: a chunk, an error, or None for 'nothing more'."""
        self._items.append(item)
        if not self._woken:
            self._woken = True
            try:
                self.loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                self.cancel()

    async def batches(self) -> AsyncIterator[list[Chunk]]:
        """Lists of chunks up to the last one (finish_reason set); raises what the worker raised."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            self._woken = False  # before reading: an item put from now on brings a new wake-up
            batch: list[Chunk] = []
            while self._items:
                item = self._items.popleft()
                if isinstance(item, BaseException):
                    if batch:
                        yield batch
                    raise item
                if item is None or item.done:
                    if item is not None:
                        batch.append(item)
                    if batch:
                        yield batch
                    return
                batch.append(item)
            if batch:
                yield batch

    async def chunks(self) -> AsyncIterator[Chunk]:
        """One chunk at a time; nothing more once the job is cancelled (a batch read before the
        cancel may hold chunks the worker made after the client stopped wanting them)."""
        async for batch in self.batches():
            for chunk in batch:
                if self.cancelled.is_set():
                    return
                yield chunk


class Worker:
    """Runs jobs on one engine in a thread of its own.

    A request that finds nothing else waiting runs alone in sequence 0, where the engine reuses the
    KV cache of a prompt that starts like the last one (a chat's earlier turns). With ``parallel`` > 1,
    requests that are waiting together run together as parallel sequences.
    """

    def __init__(self, engine: Engine, parallel: int = 1) -> None:
        self.engine = engine
        self.parallel = max(1, min(parallel, engine.n_seq_max))
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.running = 0
        self.completed = 0
        self.cancelled = 0  # stopped early because the client left
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moelocal-engine", daemon=True)

    @property
    def queued(self) -> int:
        return self.jobs.qsize()

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Stop at the next token and drop what is queued; False if the worker did not leave in time."""
        self._stopping.set()
        self.jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopping.is_set():
            job = self.jobs.get()
            if job is None or self._stopping.is_set():
                break
            if job.cancelled.is_set():
                self.cancelled += 1
                job.put(None)
            elif self.parallel > 1 and not self.jobs.empty():
                self._run_many(job)
            else:
                self._run_one(job)
        self._drain()

    def _run_one(self, job: Job) -> None:
        self.running = 1
        stream: Iterator[Chunk] | None = None
        try:
            stream = self.engine.generate(job.tokens, job.params)
            for chunk in stream:
                if job.cancelled.is_set() or self._stopping.is_set():
                    self.cancelled += 1
                    break  # closing the generator leaves the KV cache consistent for the next request
                job.put(chunk)
                if chunk.done:
                    self.completed += 1
        except Exception as exc:
            job.put(exc)
        finally:
            if stream is not None:
                stream.close()  # type: ignore[attr-defined]
            self.running = 0
            job.put(None)

    def _run_many(self, first: Job) -> None:
        """``first`` and whatever else is queued, as parallel sequences sharing each llama_decode.

        generate_many reads its requests lazily but has no way to hear "nothing new yet", nor to stop
        one sequence: so a run takes what is queued when it starts or a sequence frees up, requests
        that arrive when the queue has run dry wait for the next run, and a cancelled request is
        stopped through its max_tokens (see _Cancellable).
        """
        wave: list[Job] = []

        def source() -> Iterator[tuple[list[int], SamplingParams]]:
            job: Job | None = first
            while job is not None:
                if job.cancelled.is_set():
                    self.cancelled += 1
                    job.put(None)
                else:
                    wave.append(job)
                    self.running += 1
                    # resolved first: the engine then keeps this very object (resolving makes a copy)
                    yield job.tokens, _Cancellable.wrap(self.engine.sampling(job.params), job.cancelled)
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    return
                if job is None:  # stop() was called: the loop in _run sees _stopping
                    return

        try:
            for chunk in self.engine.generate_many(source(), parallel=self.parallel):
                job = wave[chunk.index]
                if self._stopping.is_set():
                    job.cancel()  # every sequence ends at its next token
                cancelled = job.cancelled.is_set()  # read once: the client may cancel once it has the last chunk
                if chunk.finish_reason == "error":
                    job.put(UsageError(chunk.text))
                elif not cancelled:
                    job.put(chunk)
                if chunk.done:
                    self.running -= 1
                    if cancelled:
                        self.cancelled += 1
                    elif chunk.finish_reason != "error":
                        self.completed += 1
                    job.put(None)
        except Exception as exc:
            for job in wave:
                job.put(exc)
        finally:
            self.running = 0
            for job in wave:
                job.put(None)

    def _drain(self) -> None:
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.cancel()
                job.put(None)


class _Cancellable(SamplingParams):
    """SamplingParams whose ``max_tokens`` reads as 1 once ``event`` is set.

    The engine's per-sequence stream checks ``max_tokens`` after every token, so a cancelled
    sequence of a generate_many run ends (finish_reason "length") at its next token and frees its
    slot; the other sequences go on. A stop-gap until the engine has a cancel hook.
    """

    @classmethod
    def wrap(cls, params: SamplingParams, event: threading.Event) -> SamplingParams:
        obj = cls(**{f: getattr(params, f) for f in params.__dataclass_fields__})
        object.__setattr__(obj, "_event", event)
        return obj

    @property  # type: ignore[override]
    def max_tokens(self) -> int:
        event = self.__dict__.get("_event")
        return 1 if event is not None and event.is_set() else self.__dict__["_max_tokens"]

    @max_tokens.setter
    def max_tokens(self, value: int) -> None:
        self.__dict__["_max_tokens"] = value


# ---- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """A parsed completion request: prompt tokens, sampling, and how to answer."""

    tokens: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool


def chat_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """OpenAI chat messages as the dicts a chat template reads: role and content, an assistant's
    ``tool_calls`` (``content`` may then be null) and ``reasoning_content``, a tool result's
    ``tool_call_id`` (and ``name``). Anything malformed is a 400 that names it."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects",
                       param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] is not an object", param=f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}",
                           param=f"messages[{i}].role")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role,
                               "content": _content(m.get("content"), i)}
        if role == "assistant":
            if m.get("tool_calls") is not None:
                msg["tool_calls"] = _tool_calls(m["tool_calls"], i)
            reasoning = m.get("reasoning_content")
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise ApiError(400, f"messages[{i}].reasoning_content must be a string",
                                   param=f"messages[{i}].reasoning_content")
                msg["reasoning_content"] = reasoning
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ApiError(400, f"messages[{i}] (role tool) needs the 'tool_call_id' of the call it answers",
                               param=f"messages[{i}].tool_call_id")
            msg["tool_call_id"] = call_id
            if isinstance(m.get("name"), str):
                msg["name"] = m["name"]
        out.append(msg)
    return out


def _tool_calls(calls: Any, i: int) -> list[dict[str, Any]]:
    shape = 'a list of {"id", "type": "function", "function": {"name", "arguments"}} objects'
    if not isinstance(calls, list):
        raise ApiError(400, f"messages[{i}].tool_calls must be {shape}", param=f"messages[{i}].tool_calls")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        where = f"messages[{i}].tool_calls[{j}]"
        if not isinstance(fn, dict) or c.get("type", "function") != "function":
            raise ApiError(400, f"{where} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                           "\"arguments\"}}", param=where)
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ApiError(400, f"{where}.function.name must be a non-empty string", param=f"{where}.function.name")
        arguments = fn.get("arguments", "{}")
        if not isinstance(arguments, (str, dict)):
            raise ApiError(400, f"{where}.function.arguments must be a JSON string (or an object)",
                           param=f"{where}.function.arguments")
        call_id = c.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise ApiError(400, f"{where}.id must be a string", param=f"{where}.id")
        out.append({"id": call_id or f"call_{i}_{j}", "type": "function",
                    "function": {"name": fn["name"], "arguments": arguments}})
    return out


_TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def chat_tools(body: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The request's ``tools`` (OpenAI function tools), narrowed by ``tool_choice``: "none" renders
    none, a named function only that one; "auto" and "required" all of them. None: no tools."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "'tool_choice' needs 'tools' to choose from", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise ApiError(400, "'tools' must be a list of {\"type\": \"function\", \"function\": {...}} objects",
                       param="tools")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or t.get("type") != "function":
            raise ApiError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", "
                           "\"description\", \"parameters\"}}", param=f"tools[{i}]")
        if not isinstance(fn.get("name"), str) or not _TOOL_NAME.fullmatch(fn["name"]):
            raise ApiError(400, f"tools[{i}].function.name must be 1 to 64 letters, digits, '_', '.' or '-'; got "
                           f"{fn.get('name')!r}", param=f"tools[{i}].function.name")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema object",
                           param=f"tools[{i}].function.parameters")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise ApiError(400, f"tools[{i}].function.description must be a string",
                           param=f"tools[{i}].function.description")
    if choice is None or choice in ("auto", "required"):
        return list(tools)
    if choice == "none":
        return None
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(name, str):
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise ApiError(400, f"'tool_choice' names the function {name!r}, which 'tools' does not have",
                           param="tool_choice")
        return chosen
    raise ApiError(400, "'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                   "\"function\": {\"name\": ...}}", param="tool_choice")


def tool_grammar(fmt: ChatFormat, tools: Sequence[Mapping[str, Any]]) -> str | None:
    """The grammar that makes the answer calls of ``tools`` in this model's tool-call syntax, or None."""
    from moelocal.grammar import tool_call_grammar

    try:
        return tool_call_grammar(fmt.tools, tools)
    except UsageError as exc:  # a tool's parameters the converter cannot read
        raise ApiError(400, f"the tools' parameters cannot constrain the answer: {exc.message}",
                       param="tools") from None


EFFORTS = ("low", "medium", "high")


def template_args(body: Mapping[str, Any], fmt: ChatFormat, grammar: bool) -> dict[str, Any]:
    """What the request asks of the template: ``reasoning_effort`` (where the template reads it, as
    gpt-oss's does), llama-server's ``chat_template_kwargs`` ({"enable_thinking": false} ...); under
    a grammar, thinking is switched off where the template can (every token is the constrained answer)."""
    args: dict[str, Any] = {}
    extra = body.get("chat_template_kwargs")
    if extra is not None:
        if not isinstance(extra, dict):
            raise ApiError(400, "'chat_template_kwargs' must be an object", param="chat_template_kwargs")
        args.update(extra)
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in EFFORTS:
            raise ApiError(400, f"'reasoning_effort' must be one of {', '.join(EFFORTS)}; got {effort!r}",
                           param="reasoning_effort")
        if fmt.effort:
            args["reasoning_effort"] = effort
    if grammar and fmt.thinking_toggle:
        args.setdefault("enable_thinking", False)
    return args


def _content(content: Any, i: int) -> str:
    if content is None:
        return ""  # an assistant turn that only called tools
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(400, f"messages[{i}].content has a {kind!r} part; this server reads text only",
                               param=f"messages[{i}].content")
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                   param=f"messages[{i}].content")


def completion_prompt(body: Mapping[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (or a list of one string)", param="prompt")
    if not prompt:
        raise ApiError(400, "'prompt' is empty", param="prompt")
    return prompt


def sampling(body: Mapping[str, Any], room: int, base: SamplingParams) -> SamplingParams:
    """The request's sampling fields over ``base``; ``room`` (what is left of the context) is the
    default max_tokens, as OpenAI's is 'until the context is full'."""
    n = body.get("n")
    if n is not None and n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    changes: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    changes["max_tokens"] = room if max_tokens is None else _int(max_tokens, "max_tokens")
    # OpenAI's fields, and llama-server's extras (top_k, min_p, repeat_penalty, repeat_last_n)
    for key in ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"):
        if body.get(key) is not None:
            changes[key] = _number(body[key], key)
    for key, name in (("top_k", "top_k"), ("seed", "seed"), ("repeat_last_n", "penalty_last_n")):
        if body.get(key) is not None:
            changes[name] = _int(body[key], key)
    if body.get("response_format") is not None:
        from moelocal.grammar import response_format_grammar

        try:
            changes["grammar"] = response_format_grammar(body["response_format"])
        except UsageError as exc:
            raise ApiError(400, exc.message, param="response_format") from None
    if body.get("ignore_eos") is not None:
        changes["ignore_eos"] = bool(body["ignore_eos"])
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
        changes["stop"] = tuple(stop)
    try:
        return replace(base, **changes).check()
    except UsageError as exc:
        raise ApiError(400, exc.message) from None


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer", param=name)
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{name}' must be a number", param=name)
    return float(value)


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    return stream, bool(options.get("include_usage"))


# ---- responses ----------------------------------------------------------------------------------


def usage(last: Chunk) -> dict[str, Any]:
    return {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "total_tokens": last.prompt_tokens + last.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": last.cached_tokens},
    }


def assistant_message(msg: Message) -> dict[str, Any]:
    """The OpenAI ``message`` of a parsed answer: content (null when the model only called tools),
    ``reasoning_content`` (as llama-server sends it) and ``tool_calls``."""
    out: dict[str, Any] = {"role": "assistant", "content": msg.content if msg.content or not msg.tool_calls else None}
    if msg.reasoning:
        out["reasoning_content"] = msg.reasoning
    if msg.tool_calls:
        out["tool_calls"] = [c.to_openai() for c in msg.tool_calls]
    return out


def _finish_reason(last: Chunk, called: bool) -> str | None:
    return "tool_calls" if called and last.finish_reason == "stop" else last.finish_reason


def delta_fields(deltas: Sequence[Delta]) -> list[dict[str, Any]]:
    """Streamed ``delta`` objects for parsed pieces: runs of content or reasoning joined, each tool call whole."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        if d.kind == "tool_call" and d.call is not None:
            out.append({"tool_calls": [{"index": d.index, **d.call.to_openai()}]})
            continue
        if not d.text:
            continue
        key = "content" if d.kind == "content" else "reasoning_content"
        if out and set(out[-1]) == {key}:
            out[-1][key] += d.text
        else:
            out.append({key: d.text})
    return out


def _sse(data: Mapping[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _error_for(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UsageError):
        return ApiError(400, exc.message)
    if isinstance(exc, MoelocalError):
        return ApiError(500, str(exc), type="server_error")
    return ApiError(500, f"unexpected {type(exc).__name__}: {exc}", type="server_error")


def error_response(exc: BaseException) -> JSONResponse:
    err = _error_for(exc)
    return JSONResponse(err.body(), status_code=err.status)


# ---- the app ------------------------------------------------------------------------------------


def create_app(
    engine: Engine | Callable[[], Engine],
    model_id: str,
    api_key: str | None = None,
    *,
    parallel: int = 1,
    defaults: SamplingParams | None = None,
    cors_origins: Sequence[str] = (),
) -> FastAPI:
    """The server's ASGI app around ``engine`` (or a callable that loads one at startup and is then
    closed at shutdown). ``model_id`` is the one model it lists and answers to; with ``api_key``,
    every /v1 request needs ``Authorization: Bearer <api_key>``. ``defaults`` are the sampling
    settings a request does not give (the engine's own by default). ``cors_origins``: the web
    pages (``http://localhost:3000``, or ``*`` for any) whose scripts may call the API from a
    browser; none by default, so that no web site a user visits can use their model."""
    state: dict[str, Any] = {}
    base = defaults or SamplingParams()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        owned = not isinstance(engine, Engine)
        eng = engine() if owned else engine  # type: ignore[operator]
        worker = Worker(eng, parallel)
        worker.start()
        state.update(engine=eng, worker=worker, created=int(time.time()))
        try:
            yield
        finally:
            left = worker.stop()
            _app.state.stopped = left
            if owned and left:  # closing the engine under a running decode would crash the process
                eng.close()

    app = FastAPI(title="moelocal", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), code=code).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_body(request: Request) -> dict[str, Any]:
        authorize(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "you must provide a model parameter", param="model")
        if model != model_id:
            raise ApiError(404, f"the model {model!r} does not exist; this server runs {model_id!r}",
                           code="model_not_found", param="model")
        return body

    async def prepare(body: Mapping[str, Any], render: Callable[[], list[int]]) -> Call:
        eng: Engine = state["engine"]
        stream, include_usage = _stream_flags(body)
        try:
            tokens = await asyncio.to_thread(render)
        except MoelocalError as exc:  # the chat template refused these messages
            raise ApiError(400, exc.message) from None
        limit = eng.n_ctx_seq
        if not tokens:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(tokens) >= limit:
            raise ApiError(400, f"the prompt has {len(tokens)} tokens and this server's context holds {limit} "
                           "(prompt and answer together); send a shorter prompt, or start the server with a "
                           "larger --ctx", code="context_length_exceeded")
        return Call(tokens, sampling(body, limit - len(tokens), base), stream, include_usage)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        w: Worker = state["worker"]
        return {"status": "ok", "model": model_id, "running": w.running, "queued": w.queued,
                "completed": w.completed, "cancelled": w.cancelled}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [_model_card(model_id, state["created"])]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict[str, Any]:
        authorize(request)
        if name != model_id:
            raise ApiError(404, f"the model {name!r} does not exist; this server runs {model_id!r}",
                           code="model_not_found")
        return _model_card(model_id, state["created"])

    async def answer(request: Request, body: Mapping[str, Any], render: Callable[[], list[int]], chat: bool,
                     parser: Callable[[], Parser] | None = None, grammar: str | None = None) -> Response:
        """``parser`` (chat) makes the parser that takes the answer apart, once the prompt is rendered;
        ``grammar`` constrains the answer where the request's own response_format does not."""
        call = await prepare(body, render)
        if grammar and not call.params.grammar:
            call = replace(call, params=replace(call.params, grammar=grammar))
        job = Job(call.tokens, call.params, asyncio.get_running_loop())
        state["worker"].submit(job)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_id}
        if call.stream:
            return _streaming(job, call, head, chat, parser() if parser else None)
        text, last = await _collect(request, job)
        if not chat:
            said: dict[str, Any] = {"text": text}
            finish = last.finish_reason
        else:
            p = parser() if parser else Parser()
            p.feed(text)
            msg = p.finish()
            said = {"message": assistant_message(msg)}
            finish = _finish_reason(last, bool(msg.tool_calls))
        return JSONResponse({**head, "choices": [{"index": 0, **said, "logprobs": None, "finish_reason": finish}],
                             "usage": usage(last)})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_body(request)
        messages = chat_messages(body)
        tools = chat_tools(body)
        eng: Engine = state["engine"]
        fmt = eng.chat_format
        rf = body.get("response_format")
        constrained = isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema")
        # tool_choice "required" or a named function: a grammar of calls, in the syntaxes moelocal.grammar knows
        forced = tool_grammar(fmt, tools) if tools and body.get("tool_choice") not in (None, "auto") else None
        args = template_args(body, fmt, constrained or forced is not None)
        rendered: dict[str, str] = {}

        def render() -> list[int]:
            rendered["prompt"] = eng.render_chat(messages, tools=tools, **args)
            return eng.prompt_tokens(rendered["prompt"])

        def parser() -> Parser:
            # under a grammar all the model writes is the constrained answer, whatever the prompt opened
            prompt = rendered.get("prompt", "")
            return Parser(prompt) if constrained else fmt.parser(prompt, tools)

        return await answer(request, body, render, chat=True, parser=parser, grammar=forced)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_body(request)
        prompt = completion_prompt(body)
        return await answer(request, body, lambda: state["engine"].tokenize(prompt), chat=False)

    return app


def _model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "moelocal"}


async def _collect(request: Request, job: Job) -> tuple[str, Chunk]:
    """The whole answer; cancels the job if the client leaves before it is done."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()

    watcher = asyncio.ensure_future(watch())
    pieces: list[str] = []
    last: Chunk | None = None
    try:
        async for chunk in job.chunks():
            pieces.append(chunk.text)
            last = chunk
    finally:
        watcher.cancel()
        job.cancel()  # a no-op when it finished; stops it when this handler was cancelled
    if last is None or not last.done:
        raise ApiError(499, "the request was cancelled", code="cancelled")  # the client is gone: nobody reads it
    return "".join(pieces), last


def _streaming(job: Job, call: Call, head: dict[str, Any], chat: bool, parser: Parser | None = None
               ) -> StreamingResponse:
    """Server-sent events: OpenAI's chunks, then (if asked) one with the usage, then [DONE]. A chat
    answer goes through ``parser``: content, ``reasoning_content`` and ``tool_calls`` deltas."""
    if chat:
        head = {**head, "object": "chat.completion.chunk"}
        parser = parser or Parser()

    def chunk(said: dict[str, Any], finish: str | None = None) -> str:
        return _sse({**head, "choices": [{"index": 0, **said, "logprobs": None, "finish_reason": finish}]})

    async def events() -> AsyncIterator[str]:
        called = False
        try:
            if chat:
                yield chunk({"delta": {"role": "assistant", "content": ""}})
            last = None
            async for batch in job.batches():
                last = batch[-1]
                if chat:
                    deltas = [d for c in batch for d in parser.feed(c.text)]
                    if last.done:
                        deltas += parser.flush()
                    called = called or any(d.kind == "tool_call" for d in deltas)
                    text = "".join(chunk({"delta": fields}) for fields in delta_fields(deltas))
                else:
                    text = "".join(chunk({"text": c.text}) for c in batch if c.text)
                if text:
                    yield text
            if last is None or not last.done:
                return  # cancelled (the server is stopping)
            yield chunk({"delta": {}} if chat else {"text": ""}, _finish_reason(last, called) if chat
                        else last.finish_reason)
            if call.include_usage:
                yield _sse({**head, "choices": [], "usage": usage(last)})
            yield _sse("[DONE]")
        except Exception as exc:  # the headers are sent: the error goes in the stream, as OpenAI does
            yield _sse(_error_for(exc).body())
        finally:
            job.cancel()  # the client left (Starlette cancels this generator) or the answer is done

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


__all__ = ["ApiError", "Call", "Job", "Worker", "assistant_message", "chat_messages", "chat_tools", "completion_prompt",
           "create_app", "delta_fields", "sampling", "template_args", "usage"]
