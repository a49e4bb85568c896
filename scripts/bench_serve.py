#!/usr/bin/env python
"""Throughput of `moelocal serve`: tokens/s for 1 and 4 concurrent clients, in one run.

Starts the server (moelocal.server.create_app under uvicorn, the app `moelocal serve` runs) in a
subprocess on a loopback socket, once per --parallel value, and drives it with N concurrent clients
that each send --requests streaming chat completions of --gen tokens (ignore_eos, so every answer
has the same length). Reports completion tokens per second of wall time, summed over the clients,
and the mean time to first token. Each case is measured --reps times, interleaved with the others;
the median and the best are shown (on a busy machine the best is the steadier figure). The model is
a generated test model unless one is given; the plan is CPU only, as on a machine without a GPU.

Examples:

  python scripts/bench_serve.py

  python scripts/bench_serve.py model.gguf --parallel 1,4 --clients 1,4 --requests 8 --gen 128 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL_ID = "bench"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="a .gguf file; default: the generated qwen3moe Q8_0 test model")
    ap.add_argument("--parallel", default="1,4", help="server --parallel values to compare (default 1,4)")
    ap.add_argument("--clients", default="1,4", help="concurrent clients (default 1,4)")
    ap.add_argument("--requests", type=int, default=8, help="requests per client (default 8)")
    ap.add_argument("--reps", type=int, default=3, help="measurements per case; the median is shown (default 3)")
    ap.add_argument("--gen", type=int, default=128, help="tokens per answer (default 128)")
    ap.add_argument("--ctx", type=int, default=1024, help="context per sequence (default 1024)")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default 1)")
    ap.add_argument("--no-stream", action="store_true", help="ask for whole answers instead of streams")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--serve-fd", type=int, help=argparse.SUPPRESS)  # the server half, in the subprocess
    args = ap.parse_args()
    if args.serve_fd is not None:
        serve(args)
        return
    model = Path(args.model) if args.model else test_model()
    modes = [int(x) for x in args.parallel.split(",")]
    counts = [int(x) for x in args.clients.split(",")]
    runs: dict[tuple[int, int], list[dict]] = {(p, c): [] for c in counts for p in modes}
    with contextlib.ExitStack() as stack:
        urls = {p: stack.enter_context(Server(model, p, args)) for p in modes}  # idle servers cost nothing
        for url in urls.values():
            asyncio.run(drive(url, 1, 1, args))  # warm up: first decode, page cache, connections
        for _ in range(args.reps):  # interleaved, so a busy moment on the machine hits every mode alike
            for (p, c), got in runs.items():
                got.append(asyncio.run(drive(urls[p], c, args.requests, args)))
    results = []
    for (p, c), got in runs.items():
        tps = sorted(r["tokens_per_s"] for r in got)
        row = {"parallel": p, "clients": c, "tokens_per_s": statistics.median(tps), "min": tps[0], "max": tps[-1],
               "ttft_ms": statistics.median(r["ttft_ms"] for r in got), "tokens": got[0]["tokens"]}
        results.append(row)
        if not args.json:
            print(f"--parallel {p}  {c} client{'s' if c > 1 else ' '}  median {row['tokens_per_s']:7.1f} tok/s  "
                  f"best {row['max']:7.1f}  worst {row['min']:7.1f}  ({args.reps} runs of {row['tokens']} tokens)  "
                  f"first token {row['ttft_ms']:5.1f} ms")
    if args.json:
        print(json.dumps({"model": str(model), "gen": args.gen, "requests": args.requests, "reps": args.reps,
                          "threads": args.threads, "stream": not args.no_stream, "results": results}, indent=2))


def test_model() -> Path:
    from moelocal import native, testmodels

    native.install_log()  # llama.cpp's quantization log is captured, not printed
    directory = Path(tempfile.gettempdir()) / "moelocal-bench-models"
    return testmodels.build_all(directory, quants=("q8_0",), archs=("qwen3moe",))["qwen3moe-q8_0"]


# ---- the server half ---------------------------------------------------------------------------


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from moelocal.engine import Engine
    from moelocal.plan import Placement, Plan, Prediction, RunOptions
    from moelocal.server import create_app

    parallel = int(args.parallel)
    options = RunOptions(n_ctx=args.ctx * parallel, n_seq=parallel, n_threads=args.threads)
    plan = Plan(placement=Placement(), options=options, memory={}, budget={}, predicted=Prediction(0, 0), fits=True)
    sock = socket.socket(fileno=args.serve_fd)
    with Engine.load(args.model, plan) as engine:
        app = create_app(engine, MODEL_ID, parallel=parallel)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


class Server:
    """The server in a subprocess, listening on a socket made here (no port race)."""

    def __init__(self, model: Path, parallel: int, args: argparse.Namespace) -> None:
        self.cmd = [sys.executable, __file__, str(model), "--parallel", str(parallel), "--ctx", str(args.ctx),
                    "--threads", str(args.threads)]
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __enter__(self) -> str:
        import httpx

        fd = self.sock.fileno()
        self.proc = subprocess.Popen(self.cmd + ["--serve-fd", str(fd)], pass_fds=[fd],
                                     stderr=subprocess.DEVNULL if not os.environ.get("MOELOCAL_DEBUG") else None)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with code {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.__exit__()
        raise SystemExit("the server did not start within 60 s")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()


# ---- the clients -------------------------------------------------------------------------------


async def drive(url: str, clients: int, requests: int, args: argparse.Namespace) -> dict:
    import httpx

    stream = not args.no_stream
    ttfts: list[float] = []

    async def one(client: httpx.AsyncClient, c: int, i: int) -> int:
        body = {"model": MODEL_ID, "messages": [{"role": "user", "content": f"Client {c}, request {i}: tell a story."}],
                "max_tokens": args.gen, "temperature": 0, "ignore_eos": True, "stream": stream,
                "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        if not stream:
            r = await client.post(url + "/v1/chat/completions", json=body)
            r.raise_for_status()
            ttfts.append(time.perf_counter() - t0)
            return r.json()["usage"]["completion_tokens"]
        tokens = 0
        first = True
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if first and data["choices"] and data["choices"][0]["delta"].get("content"):
                    ttfts.append(time.perf_counter() - t0)
                    first = False
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
        return tokens

    async def client_loop(c: int) -> int:
        async with httpx.AsyncClient(timeout=300) as client:
            return sum([await one(client, c, i) for i in range(requests)])

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(client_loop(c) for c in range(clients)))
    seconds = time.perf_counter() - t0
    total = sum(counts)
    return {"tokens": total, "seconds": round(seconds, 3), "tokens_per_s": round(total / seconds, 1),
            "ttft_ms": round(1000 * sum(ttfts) / max(1, len(ttfts)), 1)}


if __name__ == "__main__":
    main()
