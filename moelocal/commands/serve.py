"""`moelocal serve`: an OpenAI-compatible HTTP server running the planned placement."""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Annotated

import typer

from moelocal.commands._common import ModelArg
from moelocal.commands._run import (
    CpuMoeOpt,
    CtxOpt,
    FlashAttnOpt,
    ForceOpt,
    FrequencyPenaltyOpt,
    KvTypeOpt,
    MinPOpt,
    NCpuMoeOpt,
    NetBwOpt,
    NglOpt,
    OverrideTensorOpt,
    PlacementFlags,
    PlanOpt,
    PresencePenaltyOpt,
    RepeatPenaltyOpt,
    SeedOpt,
    TempOpt,
    ThreadsOpt,
    TopKOpt,
    TopPOpt,
    WorkerMemOpt,
    WorkerOpt,
    load_engine,
    note,
    resolve_model,
    sampling,
    warn,
)
from moelocal.errors import UsageError

INSTALL_HINT = "pip install 'moelocal[serve]'"
# Seconds Ctrl-C waits for answers in flight before they are cut off.
GRACE_SECONDS = 3


def serve(
    model: ModelArg = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on. 0.0.0.0 opens the server to the "
                                      "network: add --api-key then.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="Port to listen on.")] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", help="Require 'Authorization: Bearer KEY' on "
                                                "every /v1 request.", show_default=False)] = None,
    alias: Annotated[str | None, typer.Option("--alias", help="The model id clients ask for. Default: the "
                                              "file name without .gguf.", show_default=False)] = None,
    parallel: Annotated[int, typer.Option("--parallel", "-np", help="Requests answered at once, as llama.cpp "
                                          "parallel sequences; each gets --ctx tokens of KV cache, so the plan "
                                          "changes. 1: one at a time, on the plan `chat` uses, reusing the cache "
                                          "of a conversation's earlier turns.")] = 1,
    cors_origin: Annotated[list[str] | None, typer.Option(
        "--cors-origin", help="Let scripts on this web origin call the API from a browser "
        "(http://localhost:3000; repeat for several, * for any). Default: none.")] = None,
    temp: TempOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    presence_penalty: PresencePenaltyOpt = 0.0,
    frequency_penalty: FrequencyPenaltyOpt = 0.0,
    seed: SeedOpt = None,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    plan: PlanOpt = "auto",
    cpu_moe: CpuMoeOpt = False,
    n_cpu_moe: NCpuMoeOpt = None,
    ngl: NglOpt = None,
    override_tensor: OverrideTensorOpt = None,
    force: ForceOpt = False,
    kv_type: KvTypeOpt = "f16",
    flash_attn: FlashAttnOpt = True,
    worker: WorkerOpt = None,
    worker_mem: WorkerMemOpt = None,
    net_bw: NetBwOpt = None,
) -> None:
    r"""Serve a model over an OpenAI-compatible HTTP API, its experts placed as `fit` planned.

    Endpoints: POST /v1/chat/completions and /v1/completions (streamed or not), GET /v1/models and
    GET /health. Any OpenAI client works: point its base URL at http://HOST:PORT/v1. Requests are
    queued and answered by the one loaded model; a client that disconnects stops its answer.
    The sampling flags set the defaults for requests that do not give their own (temperature, top_p,
    top_k, min_p, repeat_penalty, presence_penalty, frequency_penalty, seed); unset, the model's
    recommendation applies. response_format {"type": "json_object"} or {"type": "json_schema", ...}
    constrains an answer to JSON. Chat answers come as llama-server sends them: a thinking model's
    reasoning in message.reasoning_content, tool calls (OpenAI tools in) in message.tool_calls.
    Needs the server extras: pip install 'moelocal\[serve]'.

    Examples:

      moelocal serve Qwen3-30B-A3B-Q4_K_M.gguf --ctx 16384

      moelocal serve model.gguf --host 0.0.0.0 --port 8080 --api-key "$KEY"

      curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "Qwen3-30B-A3B-Q4_K_M", "messages": [{"role": "user", "content": "Hi"}]}'
    """
    try:  # the extras: checked before anything slow happens
        import uvicorn

        from moelocal.server import create_app
    except ImportError:
        raise UsageError("moelocal serve needs FastAPI and uvicorn", INSTALL_HINT) from None
    if parallel < 1:
        raise UsageError(f"--parallel must be at least 1, got {parallel}")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {port}")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty")
    # the defaults for requests that do not say; a request's own fields win
    defaults = sampling(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, repeat_penalty=repeat_penalty,
                        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, seed=seed,
                        max_tokens=1)  # unused: a request gives its own, or the room left
    path, summary = resolve_model(model)
    model_id = alias or model_id_for(path)
    sock = listen(host, port)  # before loading: a busy port fails in a second, not after a minute
    try:
        warning = exposure_warning(host, api_key)
        if warning:
            warn(warning)
        flags = PlacementFlags(plan=plan, cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe, ngl=ngl, force=force,
                               kv_type=kv_type, flash_attn=flash_attn,
                               workers=tuple(worker or ()), worker_mem=tuple(worker_mem or ()), net_bw=net_bw,
                               overrides=tuple(override_tensor or ()))
        engine = load_engine(path, summary, flags, ctx=ctx, threads=threads, n_seq=parallel)
        app = create_app(engine, model_id, api_key, parallel=parallel, defaults=defaults,
                         cors_origins=tuple(cors_origin or ()))
        where = engine.expert_location(summary.n_layer) if summary.is_moe else "dense model"
        bare = host.strip("[]")
        shown = f"[{bare}]" if ":" in bare else bare
        note(f"Serving {model_id} at http://{shown}:{sock.getsockname()[1]}/v1 (experts in {where}, context "
             f"{engine.n_ctx_seq}{f', {parallel} at a time' if parallel > 1 else ''}); Ctrl-C stops.")
        config = uvicorn.Config(app, log_config=log_config(), timeout_graceful_shutdown=GRACE_SECONDS)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:
            pass  # uvicorn raises Ctrl-C again once it has shut down: the server stopped as asked
        finally:
            # a worker still inside llama.cpp (it did not stop in time) keeps the model: freeing it would crash
            if getattr(app.state, "stopped", True):
                engine.close()
    finally:
        sock.close()


def log_config() -> dict:
    """uvicorn's logging with its access log on stderr too: stdout is for data, and a server prints none."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    return config


def model_id_for(path: Path) -> str:
    """'Qwen3-30B-A3B-Q4_K_M' for Qwen3-30B-A3B-Q4_K_M-00001-of-00003.gguf."""
    return re.sub(r"-\d{5}-of-\d{5}$", "", path.name.removesuffix(".gguf"))


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """What to tell someone who opens the server beyond this machine without a key."""
    if api_key is None and not is_loopback(host):
        return f"listening on {host} without --api-key: anyone who can reach this port can use the model"
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a UsageError that says why not."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except socket.gaierror:
        raise UsageError(f"--host {host!r} is not an address of this machine") from None
    except OSError as exc:
        hint = "is another server using it? pick another --port" if exc.errno == errno.EADDRINUSE else None
        why = os.strerror(exc.errno) if exc.errno else str(exc)  # create_server adds the address to strerror
        raise UsageError(f"cannot listen on {host}:{port}: {why}", hint) from None


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
