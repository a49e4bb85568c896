"""Workers on loopback: a real offload target without a GPU.

A `moelocal worker` subprocess serves this machine's CPU over llama.cpp's RPC backend. To llama.cpp
that is a device like a GPU: layers, KV cache and compute buffers really go there, and its buffer
report says so. Also: the speed model's network hand-offs, and the errors for workers that cannot be
reached, do not answer, or drop during a run.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
from synthetic import qwen3moe_summary
from typer.testing import CliRunner

from moelocal import hardware, layout, native, planner, rpc
from moelocal.cli import app
from moelocal.commands._run import PlacementFlags, build_plan, load_engine
from moelocal.engine import Engine, SamplingParams
from moelocal.errors import HardwareSpecError, UsageError
from moelocal.gguf_model import read_summary
from moelocal.hardware import GPU, GiB, Hardware
from moelocal.plan import CPU, Placement, Plan, Prediction, RunOptions

MiB = 1 << 20
EXPS = ("ffn_gate_exps", "ffn_down_exps", "ffn_up_exps")
PROMPT = "The router scores all of the experts and keeps the best two."
READY_S = 30  # a worker imports llama.cpp before it listens
N_CTX = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moelocal(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moelocal", *args], capture_output=True, text=True, timeout=timeout)


def start_worker(port: int, tmp_path) -> subprocess.Popen:
    """`moelocal worker` serving the CPU on ``port``, once it answers the protocol's HELLO."""
    err = open(tmp_path / f"worker-{port}.err", "w+")  # noqa: SIM115  closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "moelocal", "worker", "--port", str(port), "--device", "CPU",
                             "--threads", "1", "--json"], stdout=subprocess.PIPE, stderr=err, text=True)
    proc.err_file = err  # type: ignore[attr-defined]
    deadline = time.monotonic() + READY_S
    while True:
        if proc.poll() is not None:
            err.seek(0)
            raise AssertionError(f"the worker exited with {proc.returncode}: {err.read()[-2000:]}")
        try:
            rpc.probe(f"127.0.0.1:{port}", timeout=1)
            return proc
        except rpc.WorkerError:
            if time.monotonic() > deadline:
                stop_worker(proc)
                raise AssertionError(f"the worker did not answer within {READY_S} s") from None
            time.sleep(0.1)


def stop_worker(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=10)
    if proc.stdout:
        proc.stdout.close()
    proc.err_file.close()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    proc = start_worker(port, tmp_path_factory.mktemp("worker"))
    try:
        yield f"127.0.0.1:{port}", proc
    finally:
        stop_worker(proc)


@pytest.fixture(scope="module")
def path(models):
    return models["qwen3moe-q8_0"]


def no_gpu(**overrides) -> Hardware:
    """This machine without its GPUs (if any): the worker is the only offload target."""
    return hardware.with_overrides(hardware.detect(probe=False), no_gpu=True, **overrides)


# ---- the worker itself -----------------------------------------------------------------------


def test_worker_prints_its_endpoint_and_memory_and_answers_the_protocol(worker):
    endpoint, proc = worker
    line = json.loads(proc.stdout.readline())
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # what ggml's CPU device reports
    assert line["endpoint"] == endpoint and line["loopback"] is True and line["threads"] == 1
    assert [(d["name"], d["free"], d["total"]) for d in line["devices"]] == [("CPU", ram, ram)]
    info = rpc.probe(endpoint)
    assert info == rpc.WorkerInfo(endpoint, (rpc.WorkerDevice(ram, ram),), (7, 0, 0))


def test_a_second_worker_on_the_same_port_is_one_line(worker):
    port = worker[0].rsplit(":", 1)[1]
    run = moelocal("worker", "--port", port)
    assert (run.returncode, run.stdout) == (6, "")
    assert run.stderr == (f"Error: port {port} on 127.0.0.1 is already in use "
                          "(is a worker already running? pick another with --port)\n")


def test_listening_beyond_loopback_needs_allow_remote():
    run = moelocal("worker", "--host", "0.0.0.0", "--port", str(free_port()), timeout=30)
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr == ("Error: listening on 0.0.0.0 would let anyone who can reach this machine use it: "
                          "llama.cpp's RPC protocol has no authentication (keep the default 127.0.0.1 (and tunnel "
                          "over SSH), or add --allow-remote on a network you trust)\n")
    with pytest.raises(UsageError, match="not an IPv4 address"):
        rpc.bind_address("::1", allow_remote=True)
    assert rpc.bind_address("localhost", allow_remote=False) == "127.0.0.1"
    assert rpc.bind_address("0.0.0.0", allow_remote=True) == "0.0.0.0"


# ---- real offload: dense layers and KV cache on the worker, routed experts in local RAM ------


def test_a_small_worker_gets_the_dense_layers_and_kv_and_generation_matches_the_cpu(worker, path):
    endpoint, _ = worker
    summary = read_summary(path)
    options = RunOptions(n_ctx=N_CTX, n_threads=1)
    # a CPU this slow makes every byte moved to the worker worth it; the worker's budget then
    # decides how much goes there
    roomy = rpc.with_workers(no_gpu(cpu_bw="0.001"), [endpoint])
    everything = Placement(n_gpu_layers=summary.n_layer + 1, devices=("rpc0",))
    dense = replace(everything, n_cpu_moe=4, tensor_overrides=layout.n_cpu_moe_overrides(4))
    need = {k: planner.make_plan(summary, replace(dense, n_cpu_moe=k, tensor_overrides=layout.n_cpu_moe_overrides(k))
                                 if k else everything, options, roomy).memory["rpc0"].total for k in (0, 3, 4)}
    assert need[4] < need[3] < need[0]
    size = int((need[4] + need[3]) / 2 / (1 - planner.GPU_MARGIN))  # room for experts of no layer at all
    flags = PlacementFlags(workers=(endpoint,), worker_mem=(f"{size}B",))
    hw = no_gpu(cpu_bw="0.001")
    plan = build_plan(summary, flags, ctx=N_CTX, threads=1, hw=hw)
    assert plan.placement == dense and plan.fits
    assert plan.budget["rpc0"] == int(size - planner.GPU_MARGIN * size)
    small = rpc.with_workers(hw, [endpoint], mem=[f"{size}B"])
    assert not planner.make_plan(summary, everything, plan.options, small).fits  # all of it would not fit

    with load_engine(path, summary, flags, ctx=N_CTX, threads=1, hw=hw) as e:
        buft = f"RPC0[{endpoint}]"
        assert e.plan.placement == dense and e.workers == (endpoint,)
        want = layout.bytes_by_device(summary, dense)  # {"cpu": token_embd + experts, "rpc0": the rest}
        model = e.report.by_kind("model")
        assert set(model) == {"CPU", buft}
        # the log rounds to 0.01 MiB; each tensor is padded to the buffer's 32-byte alignment
        slack = 0.005 * MiB + 32 * len(summary.tensors)
        assert abs(model[buft] - want["rpc0"]) <= slack and abs(model["CPU"] - want[CPU]) <= slack
        experts = sum(t.n_bytes for t in summary.tensors if t.role == "routed_experts")
        assert want[CPU] - experts == next(t.n_bytes for t in summary.tensors if t.name == "token_embd.weight")
        # f16 K and V: 4 layers x 2 KV heads x (64 + 64) x 2 bytes x 256 cells, all on the worker
        assert e.report.by_kind("kv") == {buft: 4 * 2 * 128 * 2 * N_CTX}
        assert sorted(e.overridden) == sorted((f"blk.{il}.{t}.weight", "CPU") for il in range(4) for t in EXPS)
        assert set(e.report.by_kind("compute")) == {"CPU", buft}
        assert e.memory["rpc0"].kv == 4 * 2 * 128 * 2 * N_CTX and e.memory[CPU].kv == 0
        assert e.deviations() == []
        assert e.expert_location(summary.n_layer) == "RAM"
        assert rpc.keep_alive(e.workers) == 1  # llama.cpp's one connection to the worker
        text_rpc = text_of(e.generate(PROMPT, greedy()))
        tokens_rpc, logits_rpc = greedy_steps(e, 24)
    cpu_plan = Plan(Placement(), options, {}, {}, Prediction(0, 0), True)
    with Engine.load(path, cpu_plan) as c:
        text_cpu = text_of(c.generate(PROMPT, greedy()))
        tokens_cpu, logits_cpu = greedy_steps(c, 24)
    assert text_rpc == text_cpu
    assert tokens_rpc == tokens_cpu
    # the worker runs the same CPU kernels on the same inputs: not a bit differs
    assert float(np.max(np.abs(logits_rpc - logits_cpu))) == 0.0


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def text_of(chunks) -> str:
    return "".join(c.text for c in chunks)


def greedy_steps(e: Engine, n: int) -> tuple[list[int], np.ndarray]:
    """Greedy decoding by hand: the tokens and every step's logits, to compare runs number by number."""
    lc = native.llama()
    e.reset()
    tokens = e.tokenize(PROMPT)
    n_vocab = lc.llama_vocab_n_tokens(e._vocab)
    feed, out, rows = tokens, [], []
    for _ in range(n):
        arr = (lc.llama_token * len(feed))(*feed)
        assert lc.llama_decode(e.ctx, lc.llama_batch_get_one(arr, len(feed))) == 0
        ptr = lc.llama_get_logits_ith(e.ctx, -1)
        row = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)).copy()
        rows.append(row)
        out.append(int(row.argmax()))
        feed = [out[-1]]
    e.reset()
    return out, np.stack(rows)


def test_fit_plans_for_the_worker_and_prints_llama_cpp_flags(worker, path):
    endpoint, _ = worker
    summary = read_summary(path)
    need = planner.make_plan(summary, Placement(n_gpu_layers=5, n_cpu_moe=4,
                                                tensor_overrides=layout.n_cpu_moe_overrides(4), devices=("rpc0",)),
                             RunOptions(n_ctx=N_CTX), rpc.with_workers(no_gpu(), [endpoint])).memory["rpc0"].total
    size = int(need / (1 - planner.GPU_MARGIN)) + 1
    result = CliRunner().invoke(app, ["fit", str(path), "--worker", endpoint, "--worker-mem", f"{size}B", "--no-gpu",
                                      "--cpu-bw", "0.001", "--ctx", str(N_CTX), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    gpus = data["hardware"]["gpus"]
    assert [(g["backend"], g["endpoint"], g["remote_index"], g["total"]) for g in gpus] == [
        ("rpc", endpoint, 0, size)]
    assert data["hardware"]["network_bandwidth"] == hardware.DEFAULT_NET_BW
    assert data["hardware"]["overridden"] == ["no_gpu", "cpu_bw", "worker_mem"]
    best = data["plans"][data["recommended"]]
    assert (best["placement"]["devices"], best["placement"]["n_cpu_moe"]) == (["rpc0"], 4)
    assert set(best["memory"]) == {"cpu", "rpc0"}
    assert data["llama_cpp_flags"][:8] == ["--rpc", endpoint, "-dev", "RPC0", "-ngl", "5", "--n-cpu-moe", "4"]


# ---- workers that cannot be used -------------------------------------------------------------


def test_an_unreachable_worker_is_one_line_and_no_hang(path):
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    run = moelocal("fit", str(path), "--worker", f"127.0.0.1:{port}", "--ctx", str(N_CTX), timeout=30)
    assert time.monotonic() - t0 < 20
    assert (run.returncode, run.stdout) == (6, "")
    assert run.stderr == (f"Error: nothing listens at 127.0.0.1:{port} "
                          f"(start `moelocal worker --port {port}` on that machine first)\n")


def test_a_worker_that_does_not_answer_times_out():
    with socket.socket() as silent:  # the kernel accepts connections; nobody ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        ep = f"127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(rpc.WorkerError) as err:
            rpc.probe(ep, timeout=0.5)
        assert time.monotonic() - t0 < 3
    assert err.value.message == f"the worker at {ep} accepted the connection but did not answer within 0.5 s"
    assert err.value.hint == ("a worker serves one client at a time: is another moelocal or llama.cpp using it?")


def test_a_service_that_is_not_a_worker_is_named_as_such():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        ep = f"127.0.0.1:{srv.getsockname()[1]}"

        def answer() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

        t = threading.Thread(target=answer)
        t.start()
        with pytest.raises(rpc.WorkerError) as err:
            rpc.probe(ep, timeout=2)
        t.join(5)
    assert err.value.message == f"the service at {ep} is not a llama.cpp RPC worker"


def test_worker_addresses_are_checked():
    assert rpc.parse_endpoint("gpu-box") == ("gpu-box", rpc.DEFAULT_PORT)
    assert rpc.parse_endpoint(" 10.0.0.2:6000 ") == ("10.0.0.2", 6000)
    for bad in ("[::1]:50052", "host:0", "host:x", ":50052", "a:b:c"):
        with pytest.raises(UsageError):
            rpc.parse_endpoint(bad)
    with pytest.raises(UsageError, match="the same worker is given twice"):
        rpc.with_workers(no_gpu(), ["127.0.0.1:1", "127.0.0.1:1"])


def signal_worker_mid_run(path, tmp_path, signum: int, env: dict[str, str] | None = None):
    """Generate through a fresh worker in a child process, send the worker ``signum`` after two tokens.

    In a child: the end of such a run is the end of the process that runs the model. Returns the
    child's result, the seconds it took and the worker's endpoint."""
    port = free_port()
    proc = start_worker(port, tmp_path)
    code = textwrap.dedent(f"""
        import os
        from moelocal import hardware
        from moelocal.commands._run import PlacementFlags, load_engine
        from moelocal.engine import SamplingParams
        from moelocal.gguf_model import read_summary
        path = {str(path)!r}
        flags = PlacementFlags(cpu_moe=True, workers=("127.0.0.1:{port}",))
        hw = hardware.with_overrides(hardware.detect(probe=False), no_gpu=True)
        e = load_engine(path, read_summary(path), flags, ctx={N_CTX}, threads=1, hw=hw)
        for i, chunk in enumerate(e.generate("hi", SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))):
            if i == 2:
                os.kill({proc.pid}, {int(signum)})
        print("finished")
    """)
    try:
        t0 = time.monotonic()
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             env={**os.environ, **(env or {})})
        return run, time.monotonic() - t0, f"127.0.0.1:{port}"
    finally:
        stop_worker(proc)  # SIGKILL: ends a stopped process too


def test_a_worker_that_drops_mid_run_ends_the_run_with_one_line(path, tmp_path):
    """llama.cpp aborts the process when a worker's connection fails; moelocal makes that one line
    and exit code 6."""
    run, seconds, endpoint = signal_worker_mid_run(path, tmp_path, signal.SIGKILL)
    assert seconds < 30
    assert (run.returncode, run.stdout) == (6, "")
    assert run.stderr.splitlines() == [
        f"Error: lost the connection to the worker at {endpoint} (Remote RPC server crashed or returned "
        "malformed response); the run cannot go on (restart the worker and run again)"]


def test_a_worker_that_stops_answering_mid_run_ends_the_run_after_the_timeout(path, tmp_path):
    """A stopped worker process still has a kernel that acknowledges every byte: without the
    watchdog llama.cpp would wait on it forever (this test would time out after 60 s)."""
    run, seconds, endpoint = signal_worker_mid_run(path, tmp_path, signal.SIGSTOP, {"MOELOCAL_WORKER_TIMEOUT": "2"})
    assert seconds < 30
    assert (run.returncode, run.stdout) == (6, "")
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    sent_nothing_for = float(lines[0].split(" sent nothing for ")[1].split(" s ")[0])
    assert 2 <= sent_nothing_for < 5
    assert lines[0].startswith(f"Error: the worker at {endpoint} sent nothing for ")
    assert "the run cannot go on" in lines[0] and "MOELOCAL_WORKER_TIMEOUT" in lines[0]


def test_the_watchdog_cuts_only_a_connection_that_stays_silent_during_a_call():
    """On plain sockets: a call that waits on a silent peer is cut after the timeout; a peer that
    keeps sending within the timeout is left alone, and so is one that is silent between calls."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        endpoint = f"127.0.0.1:{server.getsockname()[1]}"
        client = socket.create_connection(server.getsockname())
        client.settimeout(10)  # without the watchdog the last call fails here instead of hanging
        peer, _ = server.accept()
        dog = rpc.Watchdog([endpoint], timeout=0.6)
        rpc._SILENT.clear()
        try:
            def chatty() -> None:  # answers in 8 pieces, 0.3 s apart: slow, but never silent for 0.6 s
                for _ in range(8):
                    time.sleep(0.3)
                    peer.sendall(b"x")

            def wait_for(n: int) -> bytes:
                got = b""
                while len(got) < n:
                    part = client.recv(n - len(got))
                    if not part:
                        break
                    got += part
                return got

            sender = threading.Thread(target=chatty)
            sender.start()
            got = dog.wrap(lambda n, _: wait_for(n))(8, None)
            sender.join()
            assert got == b"x" * 8 and rpc._SILENT == {}  # 2.4 s in all, never cut

            time.sleep(1.5)  # silent between calls: nobody waits, nothing is cut
            peer.sendall(b"y")
            assert client.recv(1) == b"y" and rpc._SILENT == {}

            t0 = time.monotonic()
            got = dog.wrap(lambda n, _: wait_for(n))(1, None)  # the peer never answers
            assert got == b"" and 0.6 <= time.monotonic() - t0 < 3
            assert list(rpc._SILENT) == [endpoint] and rpc._SILENT[endpoint] >= 0.6
        finally:
            dog.close()
            rpc._SILENT.clear()
            client.close()
            peer.close()


def test_the_worker_timeout_is_read_from_the_environment(monkeypatch):
    from moelocal import config

    monkeypatch.delenv("MOELOCAL_WORKER_TIMEOUT", raising=False)
    assert config.worker_timeout() == 120
    monkeypatch.setenv("MOELOCAL_WORKER_TIMEOUT", "7.5")
    assert config.worker_timeout() == 7.5
    for bad in ("soon", "0", "-3", "nan"):
        monkeypatch.setenv("MOELOCAL_WORKER_TIMEOUT", bad)
        with pytest.raises(UsageError, match=f"MOELOCAL_WORKER_TIMEOUT={bad} is not a number of seconds"):
            config.worker_timeout()


# ---- the plan and the speed model with workers -----------------------------------------------


def machine_with_worker(local_vram: int = 0, worker_mem: tuple[int, ...] = (24 * GiB,)) -> Hardware:
    gpus = (GPU("local", local_vram, local_vram, 1000e9, 100e12),) if local_vram else ()
    hw = Hardware(cpu_name="test cpu", cpu_cores=8, ram_total=64 * GiB, ram_available=64 * GiB,
                  cpu_bandwidth=60e9, gpus=gpus, cpu_flops=8 * 40e9)
    info = rpc.WorkerInfo("10.0.0.2:50052", tuple(rpc.WorkerDevice(m, m) for m in worker_mem), (7, 0, 0))
    return hardware.with_workers(hw, [info])


def test_workers_are_named_rpc_and_go_first_in_the_device_list():
    hw = machine_with_worker(16 * GiB, (24 * GiB, 8 * GiB))
    assert hw.gpu_names == ("gpu0", "rpc0", "rpc1")
    assert hw.workers == ("10.0.0.2:50052",)
    assert hw.gpu_named("rpc1").remote_index == 1 and hw.gpu_named("rpc1").free == 8 * GiB
    assert set(planner.budgets(hw)) == {CPU, "gpu0", "rpc0", "rpc1"}
    # llama.cpp's own order: the workers' devices first, so the output layer sits on a local GPU
    assert planner._gpu_devices(hw) == (("rpc0", "rpc1", "gpu0"), (24.0 * GiB, 8.0 * GiB, 16.0 * GiB))
    plan = planner.fit(qwen3moe_summary(), hw, RunOptions(n_ctx=8192)).best
    assert plan.placement.devices == ("rpc0", "rpc1", "gpu0")
    assert planner.llama_cpp_flags(plan, hw)[:4] == ["--rpc", "10.0.0.2:50052", "-dev", "RPC0,RPC1,CUDA0"]


def test_a_hand_off_to_a_worker_costs_a_round_trip_and_the_bytes_over_the_network():
    hw = machine_with_worker(16 * GiB)
    act = 2048 * 4
    assert planner._hop_seconds(hw, CPU, "rpc0", act) == planner.NET_HOP_LATENCY_S + act / hardware.DEFAULT_NET_BW
    assert planner._hop_seconds(hw, "rpc0", "gpu0", act) == planner.NET_HOP_LATENCY_S + act / hw.network_bandwidth
    assert planner._hop_seconds(hw, "gpu0", CPU, act) == planner.HOP_LATENCY_S + act / hw.pcie_bandwidth
    # the same placement on a worker's device is slower than on a local GPU of the same speed, and a
    # faster network narrows the gap
    s = qwen3moe_summary()
    opts = RunOptions(n_ctx=8192)
    n = s.n_layer + 1
    local = replace(hw, gpus=(replace(hw.gpus[1], backend="cuda", endpoint=""),))
    experts_home = dict(n_gpu_layers=n, n_cpu_moe=s.n_layer, tensor_overrides=layout.cpu_moe_overrides())
    on_gpu = planner.predict(s, Placement(devices=("gpu0",), **experts_home), opts, local).decode_tps
    on_worker = planner.predict(s, Placement(devices=("rpc0",), **experts_home), opts, hw).decode_tps
    fast_net = replace(hw, network_bandwidth=hardware.parse_network_bandwidth("10Gbit"))
    on_fast_worker = planner.predict(s, Placement(devices=("rpc0",), **experts_home), opts, fast_net).decode_tps
    assert on_worker < on_fast_worker < on_gpu
    # the activations go in, to the experts in RAM and back in each of the 48 layers, and the logits
    # come back: the two networks differ by exactly those bytes (up to the rounding of tokens/s)
    moved = (2 * s.n_layer + 1) * s.n_embd * 4 + s.n_vocab * 4
    slower = moved * (1 / hw.network_bandwidth - 1 / fast_net.network_bandwidth)
    rounding = 0.005 / on_worker**2 + 0.005 / on_fast_worker**2
    assert abs((1 / on_worker - 1 / on_fast_worker) - slower) <= rounding


def test_worker_memory_and_network_overrides():
    hw = machine_with_worker(0, (24 * GiB, 24 * GiB))
    info = rpc.WorkerInfo("h:1", (rpc.WorkerDevice(24 * GiB, 24 * GiB),), (7, 0, 0))
    base = Hardware("cpu", 8, 64 * GiB, 64 * GiB, 60e9)
    small = hardware.with_workers(base, [info], mem=["4GiB"], net_bw="10Gbit")
    assert (small.gpus[0].free, small.gpus[0].total, small.network_bandwidth) == (4 * GiB, 4 * GiB, 1.25e9)
    assert small.overridden == ("worker_mem", "net_bw")
    with pytest.raises(HardwareSpecError, match="--worker-mem gives 2 sizes for 1 worker device"):
        hardware.with_workers(base, [info], mem=["4GiB,2GiB"])
    assert [g.free for g in hw.gpus] == [24 * GiB, 24 * GiB]
    with pytest.raises(UsageError, match="--worker-mem and --net-bw describe workers"):
        build_plan(qwen3moe_summary(), PlacementFlags(net_bw="10Gbit"), ctx=4096, threads=1, hw=base)



def test_hardware_facts_sit_below_rpc_and_the_engine():
    """hardware imports neither rpc nor the engine, and rpc does not import the engine: no circle."""
    code = ("import json, sys\n"
            "def ours(): return sorted(m for m in sys.modules if m.startswith('moelocal.'))\n"
            "import moelocal.hardware; a = ours()\n"
            "import moelocal.rpc; print(json.dumps([a, ours()]))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    after_hardware, after_rpc = json.loads(run.stdout)
    assert after_hardware == ["moelocal.errors", "moelocal.hardware"]
    assert "moelocal.engine" not in after_rpc and "moelocal.native" not in after_rpc
    assert rpc.WorkerInfo is hardware.WorkerInfo and rpc.hardware.default_threads() >= 1
