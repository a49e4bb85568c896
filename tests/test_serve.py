"""`moelocal serve`: a real uvicorn server on loopback around a real engine, driven by the official
openai client. Every answer is checked against what the engine itself generates for the same settings."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from moelocal import testmodels
from moelocal.engine import Engine, SamplingParams
from moelocal.errors import UsageError
from moelocal.plan import Placement, Plan, Prediction, RunOptions

CTX = 2048  # per sequence: room for answers long enough to be cut off mid-stream
SYSTEM = {"role": "system", "content": "You are terse."}
GREEDY = SamplingParams(temperature=0, max_tokens=24)


def cpu_plan(ctx: int = CTX, n_seq: int = 1) -> Plan:
    """What the planner picks on a machine without a GPU; one thread, as this machine is shared."""
    options = RunOptions(n_ctx=ctx * n_seq, n_seq=n_seq, n_threads=1)
    return Plan(placement=Placement(), options=options, memory={}, budget={}, predicted=Prediction(0, 0), fits=True)


@pytest.fixture(scope="module")
def model(model_dir: Path) -> Path:
    return testmodels.build_all(model_dir, quants=("q8_0",), archs=("qwen3moe",))["qwen3moe-q8_0"]


@pytest.fixture(scope="module")
def ref(model: Path) -> Iterator[Engine]:
    """An engine of its own to compute the expected answers (the served one belongs to its worker)."""
    with Engine.load(model, cpu_plan()) as engine:
        yield engine


def expected(engine: Engine, prompt, params: SamplingParams) -> tuple[str, object]:
    engine.reset()
    chat = isinstance(prompt, list) and isinstance(prompt[0], dict)
    stream = engine.chat(prompt, params) if chat else engine.generate(prompt, params)
    chunks = list(stream)
    return "".join(c.text for c in chunks), chunks[-1]


@contextmanager
def running(app) -> Iterator[str]:
    """``app`` under uvicorn in a thread, on a free loopback port; stops (and is checked stopped) on exit."""
    import uvicorn

    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


@contextmanager
def serving(model: Path, *, n_seq: int = 1, ctx: int = CTX, **options) -> Iterator[str]:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from moelocal.server import create_app

    with Engine.load(model, cpu_plan(ctx, n_seq)) as engine, running(
        create_app(engine, "qwen3moe-q8_0", parallel=n_seq, **options)
    ) as url:
        yield url


@pytest.fixture(scope="module")
def url(model: Path) -> Iterator[str]:
    with serving(model) as base:
        yield base


def client(base: str, key: str = "unused"):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)


def health(base: str) -> dict:
    import httpx

    r = httpx.get(base + "/health", timeout=10)
    assert r.status_code == 200
    return r.json()


def wait_idle(base: str, cancelled: int, within: float) -> dict:
    """/health once nothing runs and ``cancelled`` requests were cut short, or fail after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        h = health(base)
        if h["running"] == 0 and h["cancelled"] == cancelled:
            return h
        assert time.monotonic() < deadline, f"still busy after {within} s: {h}"
        time.sleep(0.02)


def still_serves(base: str) -> None:
    r = client(base).completions.create(model="qwen3moe-q8_0", prompt="Hi", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 3
    assert health(base)["status"] == "ok"


# ---- answers ------------------------------------------------------------------------------------


def test_chat_is_the_engines_answer_greedy_and_seeded(url, ref):
    messages = [SYSTEM, {"role": "user", "content": "Name a moon of Jupiter."}]
    want, last = expected(ref, messages, GREEDY)
    r = client(url).chat.completions.create(model="qwen3moe-q8_0", messages=messages, temperature=0, max_tokens=24)
    assert r.object == "chat.completion" and r.model == "qwen3moe-q8_0"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == last.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ref.chat_tokens(messages)), 24)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24

    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=16)
    want, _ = expected(ref, messages, seeded)
    r = client(url).chat.completions.create(model="qwen3moe-q8_0", messages=messages, temperature=0.9, top_p=0.9,
                                            seed=11, max_tokens=16)
    assert r.choices[0].message.content == want
    # the same conversation again: the server's cache already holds the prompt
    assert r.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1


def test_chat_stream_carries_the_same_text_and_usage(url, ref):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Tell "}, {"type": "text", "text": "a tale."}]}]
    want, _ = expected(ref, [{"role": "user", "content": "Tell a tale."}], GREEDY)
    stream = client(url).chat.completions.create(model="qwen3moe-q8_0", messages=messages, temperature=0,
                                                 max_tokens=24, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == len(ref.chat_tokens([{"role": "user", "content": "Tell a tale."}]))
    assert len({c.id for c in chunks}) == 1


def test_completions_streamed_or_not_with_a_stop_string(url, ref):
    prompt = "Once upon a time"
    want, last = expected(ref, prompt, SamplingParams(temperature=0, max_tokens=20))
    api = client(url)
    r = api.completions.create(model="qwen3moe-q8_0", prompt=prompt, temperature=0, max_tokens=20)
    assert r.object == "text_completion"
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ref.tokenize(prompt)), 20)
    streamed = list(api.completions.create(model="qwen3moe-q8_0", prompt=[prompt], temperature=0, max_tokens=20,
                                           stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "length"

    stop = want[len(want) // 2 :][:3]  # a piece from the middle: the answer ends just before it
    head, _ = expected(ref, prompt, SamplingParams(temperature=0, max_tokens=20, stop=(stop,)))
    r = api.completions.create(model="qwen3moe-q8_0", prompt=prompt, temperature=0, max_tokens=20, stop=[stop])
    assert r.choices[0].text == head == want[: want.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_models_and_health(url):
    api = client(url)
    assert [m.id for m in api.models.list()] == ["qwen3moe-q8_0"]
    assert api.models.retrieve("qwen3moe-q8_0").owned_by == "moelocal"
    h = health(url)
    assert (h["status"], h["model"], h["running"], h["queued"]) == ("ok", "qwen3moe-q8_0", 0, 0)


# ---- bad requests -------------------------------------------------------------------------------


def test_bad_requests_get_openai_errors_and_the_server_goes_on(url, ref):
    import httpx
    import openai

    endpoint = url + "/v1/chat/completions"
    r = httpx.post(endpoint, content=b'{"model": "qwen3moe-q8_0", "messages": [', timeout=10)
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "the request body is not valid JSON: Expecting value: line 1 column 41 "
                                  "(char 40)", "type": "invalid_request_error", "param": None, "code": None}}
    r = httpx.post(endpoint, json=["not", "an", "object"], timeout=10)
    assert (r.status_code, r.json()["error"]["message"]) == (400, "the request body must be a JSON object")
    r = httpx.post(endpoint, json={"model": "qwen3moe-q8_0", "messages": []}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.get(url + "/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"

    api = client(url)
    user = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.NotFoundError) as e:
        api.chat.completions.create(model="gpt-4o", messages=user)
    assert e.value.status_code == 404
    assert e.value.body == {"message": "the model 'gpt-4o' does not exist; this server runs 'qwen3moe-q8_0'",
                            "type": "invalid_request_error", "param": "model", "code": "model_not_found"}

    huge = [{"role": "user", "content": "hello " * 1500}]
    n = len(ref.chat_tokens(huge))
    assert n >= CTX
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="qwen3moe-q8_0", messages=huge, stream=True)
    assert e.value.body["code"] == "context_length_exceeded"
    assert e.value.body["message"] == (f"the prompt has {n} tokens and this server's context holds {CTX} (prompt and "
                                       "answer together); send a shorter prompt, or start the server with a larger "
                                       "--ctx")

    for bad, message in (
        ({"n": 2}, "only n=1 is supported"),
        ({"temperature": "hot"}, "'temperature' must be a number"),
        ({"max_tokens": 0}, "max_tokens must be at least 1, got 0"),
        ({"stop": [1]}, "'stop' must be a string or a list of strings"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(model="qwen3moe-q8_0", messages=user, extra_body=bad)
        assert e.value.body["message"] == message
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="qwen3moe-q8_0", messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert e.value.body["message"] == "messages[0].content has a 'image_url' part; this server reads text only"
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model="qwen3moe-q8_0", prompt="")
    assert e.value.body["message"] == "'prompt' is empty"
    still_serves(url)


def test_api_key_is_required_on_every_v1_request(model):
    import httpx
    import openai

    with serving(model, ctx=256, api_key="s3cret") as base:
        with pytest.raises(openai.AuthenticationError) as e:
            client(base, "wrong").chat.completions.create(model="qwen3moe-q8_0",
                                                          messages=[{"role": "user", "content": "Hi"}])
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
            r = httpx.request(method, base + path, content=b"{", timeout=10)
            assert r.status_code == 401, path
            assert r.json()["error"]["message"] == ("invalid or missing API key: send the header "
                                                    "'Authorization: Bearer <key>'")
        assert health(base)["status"] == "ok"  # health checks need no key
        r = client(base, "s3cret").completions.create(model="qwen3moe-q8_0", prompt="Hi", max_tokens=2)
        assert r.usage.completion_tokens <= 2


def test_browsers_are_let_in_only_from_the_origins_given(model, url):
    """CORS: without --cors-origin no web page may call the API from a browser; with it, that
    origin's preflight and requests are answered with its Access-Control-Allow-Origin."""
    import httpx

    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    body = {"model": "qwen3moe-q8_0", "prompt": "Hi", "max_tokens": 1}
    r = httpx.post(url + "/v1/completions", json=body, headers={"Origin": "http://localhost:3000"}, timeout=30)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers  # the default: none
    with serving(model, ctx=256, api_key="k", cors_origins=("http://localhost:3000",)) as base:
        ok = httpx.options(base + "/v1/completions", headers={"Origin": "http://localhost:3000", **preflight})
        assert ok.status_code == 200  # a preflight needs no key
        assert ok.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        other = httpx.options(base + "/v1/completions", headers={"Origin": "https://evil.example", **preflight})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        r = httpx.post(base + "/v1/completions", json=body, timeout=30,
                       headers={"Origin": "http://localhost:3000", "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"


# ---- clients that leave -------------------------------------------------------------------------


def test_a_client_that_disconnects_stops_its_answer(url):
    import httpx

    before = health(url)["cancelled"]
    body = {"model": "qwen3moe-q8_0", "messages": [{"role": "user", "content": "Go on and on."}], "stream": True,
            "temperature": 0, "ignore_eos": True}  # no max_tokens: it would run until the context is full
    with httpx.Client(timeout=30) as http, http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                seen += 1
            if seen == 3:
                break  # leaving the block closes the connection mid-answer
    wait_idle(url, before + 1, within=3)

    # a whole (not streamed) answer is stopped too when its client gives up waiting
    body["stream"] = False
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.2))
    wait_idle(url, before + 2, within=3)
    still_serves(url)


# ---- parallel sequences -------------------------------------------------------------------------


def test_parallel_server_answers_concurrent_clients_like_the_engine(model, ref):
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"Question {i}: what is {7 * i}?" for i in range(6)]
    wants = [expected(ref, [{"role": "user", "content": p}], GREEDY)[0] for p in prompts]

    with serving(model, n_seq=4, ctx=256) as base:
        api = client(base)

        def ask(p: str):
            return api.chat.completions.create(model="qwen3moe-q8_0", messages=[{"role": "user", "content": p}],
                                               temperature=0, max_tokens=24)

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, prompts))
        assert [a.choices[0].message.content for a in answers] == wants
        assert {a.usage.completion_tokens for a in answers} == {24}
        h = wait_idle(base, 0, within=3)
        assert h["completed"] == 6


def test_parallel_sequences_cancel_one_and_finish_the_other(model, ref):
    """Two jobs queued before the worker starts run as one generate_many batch; cancelling one ends
    it at its next token while the other runs to the end."""
    pytest.importorskip("fastapi")
    from moelocal.server import Job, Worker

    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    prompts = [ref.tokenize("The first story"), ref.tokenize("The second story")]
    want, _ = expected(ref, prompts[1], params)

    async def run(worker: Worker) -> tuple[int, str]:
        loop = asyncio.get_running_loop()
        jobs = [Job(p, params, loop) for p in prompts]
        for j in jobs:
            worker.submit(j)
        worker.start()
        n_first = 0
        async for _ in jobs[0].chunks():
            n_first += 1
            if n_first == 3:
                jobs[0].cancel()
        text = "".join([c.text async for c in jobs[1].chunks()])
        return n_first, text

    with Engine.load(model, cpu_plan(256, 4)) as engine:
        worker = Worker(engine, parallel=4)
        try:
            n_first, text = asyncio.run(run(worker))
        finally:
            assert worker.stop()
    assert n_first == 3  # nothing is delivered after the cancel, and the sequence stopped (or chunks() would hang)
    assert text == want
    assert (worker.completed, worker.cancelled) == (1, 1)


# ---- the command --------------------------------------------------------------------------------


def test_serve_without_the_extras_says_how_to_get_them(monkeypatch, capsys):
    import typer

    from moelocal import cli
    from moelocal.commands import serve

    for name in ("fastapi", "uvicorn", "moelocal.server"):
        monkeypatch.setitem(sys.modules, name, None)  # `import fastapi` now raises ImportError
    app = typer.Typer()
    serve.register(app)
    app.command("other")(lambda: None)  # two commands: `serve` stays a subcommand
    monkeypatch.setattr(cli, "app", app)
    with pytest.raises(SystemExit) as e:
        cli.main(["serve"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "Error: moelocal serve needs FastAPI and uvicorn (pip install 'moelocal[serve]')\n"


def test_listening_and_naming_helpers():
    from moelocal.commands.serve import exposure_warning, is_loopback, listen, model_id_for

    assert [is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "0.0.0.0", "10.1.2.3",
                                     "example.org")] == [True, True, True, True, True, False, False, False]
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("0.0.0.0", "k") is None
    assert exposure_warning("0.0.0.0", None) == ("listening on 0.0.0.0 without --api-key: anyone who can reach "
                                                 "this port can use the model")
    assert model_id_for(Path("/m/Qwen3-30B-A3B-Q4_K_M-00001-of-00003.gguf")) == "Qwen3-30B-A3B-Q4_K_M"
    assert model_id_for(Path("tiny.gguf")) == "tiny"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(UsageError) as e:
            listen("127.0.0.1", port)
    assert str(e.value) == (f"cannot listen on 127.0.0.1:{port}: Address already in use (is another server using "
                            "it? pick another --port)")


def test_moelocal_serve_runs_the_planned_model_until_ctrl_c(model, tmp_path):
    """The whole command in a subprocess: plan, load, listen on a free port, answer, stop on SIGINT."""
    pytest.importorskip("uvicorn")
    import httpx

    proc = subprocess.Popen(
        [sys.executable, "-m", "moelocal", "serve", str(model), "--port", "0", "--ctx", "256", "--threads", "1",
         "--alias", "tiny", "--api-key", "k"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"},
    )
    try:
        lines = []
        for line in proc.stderr:  # the server says where it listens before uvicorn starts
            lines.append(line)
            m = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", line)
            if m or len(lines) > 200:
                break
        assert m, "".join(lines)
        assert line.startswith(f"Serving tiny at {m.group(1)} (experts in RAM (CPU only), context 256)")
        base = m.group(1)
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.get(base + "/models", headers={"Authorization": "Bearer k"}, timeout=5)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert [m["id"] for m in r.json()["data"]] == ["tiny"]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert out == ""  # requests are logged on stderr: stdout carries data, and a server prints none
        assert '"GET /v1/models HTTP/1.1" 200' in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- structured output and sampling fields ------------------------------------------------------

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


def test_response_format_json_schema_validates_for_20_seeds_on_the_demo_model():
    jsonschema = pytest.importorskip("jsonschema")
    openai = pytest.importorskip("openai")
    from moelocal.server import create_app
    from moelocal.source import demo_model_path

    user = [{"role": "user", "content": "Describe a person as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    with Engine.load(demo_model_path(), cpu_plan(512)) as engine, running(create_app(engine, "demo")) as base:
        api = client(base)
        answers = set()
        for seed in range(20):
            if seed % 2:  # streamed, the pieces put together
                pieces = list(api.chat.completions.create(model="demo", messages=user, response_format=fmt,
                                                          temperature=0.9, seed=seed, max_tokens=300, stream=True))
                text = "".join(p.choices[0].delta.content or "" for p in pieces if p.choices)
                finish = [p.choices[0].finish_reason for p in pieces if p.choices][-1]
            else:
                r = api.chat.completions.create(model="demo", messages=user, response_format=fmt, temperature=0.9,
                                                seed=seed, max_tokens=300)
                text, finish = r.choices[0].message.content, r.choices[0].finish_reason
            assert finish == "stop"
            jsonschema.validate(json.loads(text), PERSON)
            answers.add(text)
        assert len(answers) > 10
        r = api.chat.completions.create(model="demo", messages=user, response_format={"type": "json_object"},
                                        temperature=0.9, seed=1, max_tokens=300)
        assert isinstance(json.loads(r.choices[0].message.content), dict)

        for bad, message in (
            ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strange"}}},
             "the JSON schema cannot be turned into a grammar: Unrecognized schema: {'type': 'strange'}"),
            ({"type": "yaml"}, "'response_format.type' must be text, json_object or json_schema; got 'yaml'"),
        ):
            with pytest.raises(openai.BadRequestError) as e:
                api.chat.completions.create(model="demo", messages=user, response_format=bad)
            assert (e.value.body["message"], e.value.body["param"]) == (message, "response_format")
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(model="demo", messages=user, presence_penalty=3)
        assert e.value.body["message"] == "presence_penalty must be in [-2, 2], got 3.0"


def test_penalties_and_llama_server_fields_reach_the_sampler(url, ref):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repeat_penalty=1.5, presence_penalty=0.5,
                            frequency_penalty=0.3, penalty_last_n=32, top_k=5, min_p=0.1)
    want, _ = expected(ref, messages, params)
    plain, _ = expected(ref, messages, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert want != plain  # the penalties change this answer
    r = client(url).chat.completions.create(model="qwen3moe-q8_0", messages=messages, temperature=0, max_tokens=16,
                                            presence_penalty=0.5, frequency_penalty=0.3, extra_body={
                                                "ignore_eos": True, "repeat_penalty": 1.5, "repeat_last_n": 32,
                                                "top_k": 5, "min_p": 0.1})
    assert r.choices[0].message.content == want


# ---- reasoning and tool calls: the scripted models (moelocal.scripted) ----------------------------

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# what each script says, taken apart (moelocal.scripted's scripts through the family's parser)
PLAIN = ("The user greets me. I will greet them back.", "Hello! How can I help you today?")
CALLING = "The user wants the weather in Paris. I should call get_weather."
ANSWER = ("The tool says it is sunny and warm.", "It is sunny in Paris, 18 degrees.")


@pytest.fixture(scope="module", params=["qwen3", "gpt-oss"])
def scripted(request, scripted_models) -> Iterator[tuple[str, str]]:
    """(family, base URL) of a server running that family's scripted model."""
    pytest.importorskip("fastapi")
    from moelocal.server import create_app

    with Engine.load(scripted_models[request.param], cpu_plan()) as engine, running(
        create_app(engine, "scripted")
    ) as base:
        yield request.param, base


def streamed(api, **request) -> tuple[str, str, list, str]:
    """(reasoning, content, tool-call deltas, finish reason) of a streamed chat answer."""
    reasoning, content, calls, finish = [], [], [], None
    for c in api.chat.completions.create(model="scripted", temperature=0, stream=True, **request):
        if not c.choices:
            continue
        d = c.choices[0].delta
        reasoning.append(getattr(d, "reasoning_content", None) or "")
        content.append(d.content or "")
        calls += d.tool_calls or []
        finish = c.choices[0].finish_reason or finish
    return "".join(reasoning), "".join(content), calls, finish


def test_reasoning_comes_apart_from_the_answer(scripted):
    api = client(scripted[1])
    r = api.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Hi!"}], temperature=0)
    m = r.choices[0].message
    assert (m.reasoning_content, m.content, m.tool_calls, r.choices[0].finish_reason) == (*PLAIN, None, "stop")
    assert streamed(api, messages=[{"role": "user", "content": "Hi!"}]) == (*PLAIN, [], "stop")


def test_tool_calls_streamed_or_not_and_the_round_trip_with_the_result(scripted):
    api = client(scripted[1])
    r = api.chat.completions.create(model="scripted", messages=ASK, tools=WEATHER, temperature=0)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert (m.content, m.reasoning_content, len(m.tool_calls)) == (None, CALLING, 1)
    call = m.tool_calls[0]
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == (
        "function", "get_weather", {"city": "Paris"})
    assert call.id.startswith("call_")

    reasoning, content, deltas, finish = streamed(api, messages=ASK, tools=WEATHER)
    assert (reasoning, content, finish) == (CALLING, "", "tool_calls")
    assert [(d.index, d.id, d.function.name, d.function.arguments) for d in deltas] == [
        (0, call.id, "get_weather", call.function.arguments)]  # the same call, the same id

    # the second round: the assistant's call (content null) and the tool's result rendered back
    history = ASK + [m.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "celsius": 18}'}]
    r = api.chat.completions.create(model="scripted", messages=history, tools=WEATHER, temperature=0)
    m2 = r.choices[0].message
    assert (m2.reasoning_content, m2.content, m2.tool_calls, r.choices[0].finish_reason) == (*ANSWER, None, "stop")
    assert streamed(api, messages=history, tools=WEATHER) == (*ANSWER, [], "stop")


def test_tool_choice_narrows_the_tools(scripted):
    import openai

    api = client(scripted[1])
    r = api.chat.completions.create(model="scripted", messages=ASK, tools=WEATHER, tool_choice="none", temperature=0)
    assert (r.choices[0].message.content, r.choices[0].message.tool_calls) == (PLAIN[1], None)  # no tools shown
    r = api.chat.completions.create(model="scripted", messages=ASK, tools=WEATHER, temperature=0, tool_choice={
        "type": "function", "function": {"name": "get_weather"}})
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="scripted", messages=ASK, tools=WEATHER, tool_choice={
            "type": "function", "function": {"name": "get_time"}})
    assert e.value.body["message"] == "'tool_choice' names the function 'get_time', which 'tools' does not have"


def test_reasoning_effort_reaches_a_template_that_reads_it(scripted):
    import openai

    family, base = scripted
    api = client(base)
    hi = [{"role": "user", "content": "Hi!"}]
    low = api.chat.completions.create(model="scripted", messages=hi, temperature=0, reasoning_effort="low")
    again = api.chat.completions.create(model="scripted", messages=hi, temperature=0, reasoning_effort="low")
    high = api.chat.completions.create(model="scripted", messages=hi, temperature=0, reasoning_effort="high")
    assert low.choices[0].message.content == high.choices[0].message.content == PLAIN[1]
    n = low.usage.prompt_tokens
    assert again.usage.prompt_tokens_details.cached_tokens == n - 1  # the same prompt
    cached = high.usage.prompt_tokens_details.cached_tokens
    if family == "gpt-oss":  # its system message says "Reasoning: low" or "Reasoning: high"
        assert cached < n - 5
    else:  # Qwen3's template has no such switch: the prompt stays the same
        assert cached == n - 1
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="scripted", messages=hi, reasoning_effort="extreme")
    assert e.value.body["message"] == "'reasoning_effort' must be one of low, medium, high; got 'extreme'"


@pytest.mark.parametrize(("patch", "message"), [
    ({"tools": {"name": "x"}}, "'tools' must be a list of {\"type\": \"function\", \"function\": {...}} objects"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]},
     "tools[0].function.name must be 1 to 64 letters, digits, '_', '.' or '-'; got 'get weather'"),
    ({"tools": [{"type": "code_interpreter"}]},
     "tools[0] must be {\"type\": \"function\", \"function\": {\"name\", \"description\", \"parameters\"}}"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "none"}}]},
     "tools[0].function.parameters must be a JSON schema object"),
    ({"tool_choice": "required"}, "'tool_choice' needs 'tools' to choose from"),
    ({"messages": [{"role": "tool", "content": "18 C"}]},
     "messages[0] (role tool) needs the 'tool_call_id' of the call it answers"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
        "arguments": "{}"}}]}]}, "messages[0].tool_calls[0].function.name must be a non-empty string"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": {"id": "x"}}]},
     "messages[0].tool_calls must be a list of {\"id\", \"type\": \"function\", \"function\": {\"name\", "
     "\"arguments\"}} objects"),
])
def test_malformed_tools_and_messages_are_one_clear_400(scripted, patch, message):
    import httpx

    body = {"model": "scripted", "messages": ASK, **patch}
    r = httpx.post(scripted[1] + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == message and r.json()["error"]["type"] == "invalid_request_error"


def test_tool_choice_required_makes_a_hermes_model_call_even_when_it_would_answer(scripted):
    """After a tool result the scripted model answers in prose; tool_choice "required" constrains it
    with a grammar of <tool_call> blocks (Qwen3's syntax), so it calls again, with valid arguments."""
    family, base = scripted
    api = client(base)
    first = api.chat.completions.create(model="scripted", messages=ASK, tools=WEATHER, temperature=0)
    call = first.choices[0].message
    history = ASK + [call.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.tool_calls[0].id,
                                                          "content": "sunny"}]
    free = api.chat.completions.create(model="scripted", messages=history, tools=WEATHER, temperature=0)
    assert free.choices[0].finish_reason == "stop"
    # the scripted model knows no words for this moment: cities from a list keep its arguments finite
    cities = [{"type": "function", "function": {**WEATHER[0]["function"], "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}}]
    forced = api.chat.completions.create(model="scripted", messages=history, tools=cities, temperature=0,
                                         tool_choice="required", max_tokens=60)
    if family != "qwen3":  # no grammar for harmony's calls (yet): the answer is left free
        assert forced.choices[0].message.content == free.choices[0].message.content
        return
    m = forced.choices[0].message
    assert forced.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in m.tool_calls] == ["get_weather"]
    assert json.loads(m.tool_calls[0].function.arguments)["city"] in ("Paris", "Rome")
