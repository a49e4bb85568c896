"""`moelocal chat` in a real terminal: tmux runs it, types into it and reads the screen back."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import pytest

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")


class Terminal:
    """One tmux session running one command, 100 x 30 characters."""

    def __init__(self, command: str, env: dict[str, str]) -> None:
        self.name = f"moelocal-test-{uuid.uuid4().hex[:8]}"
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        # env -i: the tmux server hands its own environment to the pane, and a COLUMNS=80 from the
        # caller (CI sets one) would make rich wrap at 80 in a 100-column terminal.
        # After the command ends, say how, and keep the pane open to be read.
        script = f"env -i {exports} {command}; echo EXITED $?; sleep 60"
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", "100", "-y", "30", script], check=True)
        subprocess.run(["tmux", "set-option", "-t", self.name, "history-limit", "5000"], check=True)

    def screen(self) -> str:
        run = subprocess.run(["tmux", "capture-pane", "-p", "-J", "-S", "-5000", "-t", self.name],
                             capture_output=True, text=True)
        return run.stdout

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def type(self, line: str) -> None:
        self.keys("-l", line)
        self.keys("Enter")

    def wait(self, check: Callable[[str], bool], what: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen()
            if check(text):
                return text
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; the screen:\n{self.screen()[-3000:]}")

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


@pytest.fixture
def terminal():
    opened: list[Terminal] = []

    def start(command: str) -> Terminal:
        keep = ("MOELOCAL_HOME", "PATH", "HOME", "PYTHONPATH", "LANG", "LC_ALL", "LC_CTYPE")
        env = {k: v for k, v in os.environ.items() if k in keep}
        env["TERM"] = "xterm-256color"
        t = Terminal(command, env)
        opened.append(t)
        return t

    yield start
    for t in opened:
        t.close()


@needs_tmux
def test_chat_two_turns_a_slash_command_and_ctrl_c(models, terminal, tmp_path):
    model = models["qwen3moe-q8_0"]
    # --ignore-eos: answers run to --max-tokens, so the second one is still going when Ctrl-C comes
    cmd = (f"{shlex.quote(sys.executable)} -m moelocal chat {shlex.quote(str(model))} --seed 1 --threads 1 "
           "--ctx 8192 --max-tokens 3000 --ignore-eos")
    t = terminal(cmd)
    t.wait(lambda s: "Chatting with moelocal test qwen3moe" in s and s.rstrip().endswith(">"), "the prompt")

    t.type("Hello there")
    t.wait(lambda s: "3000 tokens · " in s and s.rstrip().endswith(">"), "the first answer and its status line")

    t.type("/stats")
    screen = t.wait(lambda s: "tokens generated: 3000" in s, "/stats")
    assert "turns: 1," in screen and "placement: CPU only" in screen and "threads: 1, context: 8192" in screen

    t.type("Tell me more")
    before = len(t.screen())
    t.wait(lambda s: len(s) > before + 200, "the second answer to start")
    t.keys("C-c")
    screen = t.wait(lambda s: "[stopped]" in s and s.rstrip().endswith(">"), "Ctrl-C to stop the answer")
    status = screen.split("[stopped]", 1)[1].strip().splitlines()[0]
    assert 0 < int(status.split(" tokens · ")[0]) < 3000  # the second answer did not run to its end
    assert "experts in RAM" in status

    saved = tmp_path / "chat.json"
    t.type(f"/save {saved}")
    # rich breaks lines that are longer than the terminal; a path may be cut anywhere
    t.wait(lambda s: f"Saved 4 messages to {saved}." in s.replace("\n", ""), "/save")
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [messages[0]["content"], messages[2]["content"]] == ["Hello there", "Tell me more"]
    assert 0 < len(messages[3]["content"]) < len(messages[1]["content"])  # the stopped answer is kept, cut short

    t.keys("C-d")
    screen = t.wait(lambda s: "EXITED" in s, "Ctrl-D to leave")
    assert "EXITED 0" in screen
    assert "Traceback" not in screen and "Error" not in screen


def test_chat_drops_the_oldest_turns_near_the_context_limit(models):
    """Without a terminal chat reads lines from stdin: four turns of 64 tokens in a 256-token context."""
    lines = "\n".join(["First question", "Second question", "/system Be brief.", "Third question",
                       "Fourth question", "/exit", "never read"]) + "\n"
    run = subprocess.run([sys.executable, "-m", "moelocal", "chat", str(models["qwen3moe-q8_0"]), "--seed", "1",
                          "--threads", "1", "--ctx", "256", "--max-tokens", "64", "--ignore-eos"],
                         input=lines, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("64 tokens · ") == 4
    assert "(dropped the 2 oldest messages to stay within the 256-token context)" in run.stderr
    assert "System message set; it applies from the next answer." in run.stderr
    assert "Error" not in run.stderr


@pytest.fixture(scope="module")
def thinking_model(llama_assets, tmp_path_factory) -> str:
    """The qwen3moe test model with Qwen3.5's real template: its generation prompt opens <think>, so
    everything the model writes is thinking, unless /think off closes the block in the prompt."""
    from moelocal import testmodels

    template = (llama_assets / "models" / "templates" / "Qwen3.5-4B.jinja").read_text(encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(testmodels, "CHATML_TEMPLATE", template)  # what the writer puts in tokenizer.chat_template
        path = testmodels.write_model("qwen3moe", tmp_path_factory.mktemp("thinking") / "qwen35-think.gguf")
    return str(path)


def _after(screen: str, line: str) -> list[str]:
    """The screen's lines after the last one that is ``line``."""
    rows = screen.splitlines()
    i = max(k for k, r in enumerate(rows) if r.strip() == line)
    return [r for r in rows[i + 1:] if r.strip()]


@needs_tmux
def test_chat_shows_thinking_apart_and_think_switches_it(thinking_model, terminal, tmp_path):
    cmd = (f"{shlex.quote(sys.executable)} -m moelocal chat {shlex.quote(thinking_model)} --seed 1 --threads 1 "
           "--ctx 4096 --max-tokens 40 --ignore-eos")
    t = terminal(cmd)
    t.wait(lambda s: "Chatting with moelocal test qwen3moe" in s and s.rstrip().endswith(">"), "the prompt")

    t.type("Hello there")
    screen = t.wait(lambda s: "40 tokens · " in s and s.rstrip().endswith(">"), "the first answer")
    after = _after(screen, "> Hello there")
    # the dimmed thinking was folded into one line; no answer text (all 40 tokens were thinking)
    assert re.fullmatch(r"thought for \d+\.\d s · 40 tokens", after[0].strip()), after
    assert after[1].startswith("40 tokens · ")

    t.type("/think off")
    t.wait(lambda s: "Thinking off from the next answer." in s, "/think off")
    t.type("Now answer")
    screen = t.wait(lambda s: s.count("40 tokens · ") == 2 and s.rstrip().endswith(">"), "the second answer")
    after = _after(screen, "> Now answer")
    assert "thought for" not in after[0] and not after[0].startswith("40 tokens")  # the answer itself

    t.type("/think on")
    t.type("/think hide")
    t.wait(lambda s: "Thinking is hidden" in s, "/think hide")
    t.type("Think again")
    screen = t.wait(lambda s: s.count("40 tokens · ") == 3 and s.rstrip().endswith(">"), "the third answer")
    after = _after(screen, "> Think again")
    assert re.fullmatch(r"thought for \d+\.\d s · 40 tokens", after[0].strip()) and "thinking…" not in screen

    t.type("/stats")
    t.wait(lambda s: "format: <think> reasoning + qwen3-coder tool calls; thinking hidden; thinking switch: on" in s,
           "/stats")
    saved = tmp_path / "think.json"
    t.type(f"/save {saved}")
    t.wait(lambda s: "Saved 6 messages" in s, "/save")
    first, second, third = json.loads(saved.read_text())["messages"][1::2]
    assert first["content"] == "" and len(first["reasoning_content"]) > 20
    assert second["content"] and "reasoning_content" not in second
    assert third["content"] == "" and third["reasoning_content"]
    t.keys("C-d")
    screen = t.wait(lambda s: "EXITED" in s, "Ctrl-D to leave")
    assert "EXITED 0" in screen and "Traceback" not in screen


def test_earlier_turns_keep_the_kv_cache_prefix_when_the_template_drops_old_reasoning(thinking_model):
    """What chat stores of an answer (the content, the reasoning apart) renders the same way in every later
    turn, so each turn reuses the cache for the whole previous prompt but its opening <think>."""
    from moelocal.commands._run import PlacementFlags, build_plan
    from moelocal.engine import Engine, SamplingParams
    from moelocal.gguf_model import read_summary

    plan = build_plan(read_summary(thinking_model), PlacementFlags(), ctx=2048, threads=1)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with Engine.load(thinking_model, plan) as engine:
        messages: list[dict] = []
        previous, thought = "", ""
        for n, text in enumerate(("First question", "Second question", "Third question")):
            messages.append({"role": "user", "content": text})
            prompt = engine.render_chat(messages)
            assert prompt.endswith("<|im_start|>assistant\n<think>\n")
            if n:
                # the old answer renders without its thinking, the same in every later prompt
                kept = previous[: -len("<think>\n")]
                assert prompt.startswith(kept) and thought not in prompt
            parser = engine.chat_format.parser(prompt)
            chunks = list(engine.generate(engine.prompt_tokens(prompt), params))
            for c in chunks:
                parser.feed(c.text)
            msg = parser.finish()
            assert msg.reasoning and msg.content == ""  # the prompt opened <think>: all of it is thinking
            messages.append(msg.to_openai())
            assert chunks[-1].cached_tokens >= (len(engine.prompt_tokens(previous[: -len("<think>\n")])) if n else 0)
            previous, thought = prompt, msg.reasoning


THOUGHT = r"thought for \d+\.\d s · (\d+) tokens"


@needs_tmux
@pytest.mark.parametrize("family", ["qwen3", "gpt-oss"])
def test_chat_with_a_scripted_thinking_model(scripted_models, terminal, tmp_path, family):
    """A scripted Qwen3 (<think>) and gpt-oss (harmony) say exactly what the real ones would: the thinking is
    shown apart, folded to one line, and the answer alone is what the conversation keeps."""
    extra = "--reasoning-effort high" if family == "gpt-oss" else ""
    cmd = (f"{shlex.quote(sys.executable)} -m moelocal chat {shlex.quote(str(scripted_models[family]))} --temp 0 "
           f"--threads 1 --ctx 2048 {extra}")
    t = terminal(cmd)
    t.wait(lambda s: "Chatting with moelocal scripted" in s and s.rstrip().endswith(">"), "the prompt")
    t.type("Hi there!")
    screen = t.wait(lambda s: " tok/s" in s and s.rstrip().endswith(">"), "the answer")
    after = _after(screen, "> Hi there!")
    m = re.fullmatch(THOUGHT, after[0].strip())
    assert m, after
    total = int(after[2].split(" tokens · ")[0])
    assert 10 < int(m.group(1)) < total
    assert after[1] == "Hello! How can I help you today?"  # the answer alone, no markup, no thinking
    assert "The user greets me" not in screen  # the dimmed thinking was replaced by its line

    t.type("/think hide")
    t.type("/think on")
    if family == "qwen3":
        t.wait(lambda s: "Thinking on from the next answer." in s, "/think on")
    else:
        t.wait(lambda s: "has no switch for thinking" in s, "/think on refused")
    t.type("Hi there!")
    screen = t.wait(lambda s: s.count(" tokens · ") == 2 and s.rstrip().endswith(">"), "the second answer")
    after = _after(screen, "> Hi there!")
    assert re.fullmatch(THOUGHT, after[0].strip()) and after[1] == "Hello! How can I help you today?"

    t.type("/stats")
    state = "format: <think> reasoning + hermes tool calls" if family == "qwen3" else "format: harmony"
    t.wait(lambda s: state in s and ("reasoning effort: high" in s or family == "qwen3"), "/stats")
    saved = tmp_path / "chat.json"
    t.type(f"/save {saved}")
    t.wait(lambda s: "Saved 4 messages" in s, "/save")
    answers = json.loads(saved.read_text())["messages"][1::2]
    assert answers == [{"role": "assistant", "content": "Hello! How can I help you today?",
                        "reasoning_content": "The user greets me. I will greet them back."}] * 2
    t.keys("C-d")
    screen = t.wait(lambda s: "EXITED" in s, "Ctrl-D to leave")
    assert "EXITED 0" in screen and "Traceback" not in screen
