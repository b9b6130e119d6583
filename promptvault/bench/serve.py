"""`promptvault bench serve`: an agent-like trace against `promptvault serve` and `mlx_lm.server`.

The trace: C conversations that all start with the same ~1,500-token system prompt (agent
instructions and JSON tool schemas), each T turns long (a user message, the server's streamed
answer appended to the history, the next user message: from turn 2 on, a tool result (a file
listing of `tool_lines` lines, ~25 tokens each: ~400 tokens by default) and a request), sent
round-robin — turn 1 of every conversation, then turn 2 of every conversation … — by one client,
one request at a time. Every server is restarted once midway (after round ceil(T/2)): before it,
mlx_lm.server answers from its RAM prompt cache; right after it, that cache is gone and only the
vault still holds the prefixes ("after restart": the first turn of each conversation); later
turns find mlx_lm.server's cache warm again ("later turns").

Setups, same model and same client code (plain HTTP + SSE, `stream_options.include_usage`):
  - `promptvault`: one `promptvault serve` on a fresh vault;
  - `mlx_lm.server`: mlx-lm's server on the same converted model directory;
  - `promptvault x2`: two `promptvault serve` processes on one fresh vault, requests alternating
    between them (a conversation's next turn lands on the other process, which must read what
    the first one stored).
Per setup and phase: TTFT (request sent → first streamed content)
p50 / p95, the share of prompt tokens the server reported as cached, and the phase's wall time.
Each server gets one small warm-up request after every start (MLX's first-call costs), not
counted; the trace's own first request is cold for every setup.
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from promptvault.errors import PromptvaultError

TOOLS = [
    ("read_file", "Read a text file of the repository and return its contents with line numbers.",
     {"path": "Path of the file, relative to the repository root.", "start_line": "First line to return (1-based).",
      "end_line": "Last line to return (inclusive); omit for the end of the file."}),
    ("write_file", "Create or overwrite a file of the repository with the given contents.",
     {"path": "Path of the file, relative to the repository root.", "contents": "The complete new contents."}),
    ("edit_file", "Replace one exact occurrence of a string in a file with another string.",
     {"path": "Path of the file.", "old": "The exact text to replace; it must occur exactly once.",
      "new": "The replacement text."}),
    ("search", "Search the repository for a regular expression and return matching lines with file names.",
     {"pattern": "A Python regular expression.", "glob": "Only files whose path matches this glob, e.g. '*.py'.",
      "max_results": "Stop after this many matches (default 50)."}),
    ("list_dir", "List the entries of a directory of the repository, with sizes and kinds.",
     {"path": "Directory path, relative to the repository root.", "depth": "How many levels to descend."}),
    ("run_tests", "Run the test suite, or part of it, and return the summary and any failures.",
     {"selector": "A pytest node id or -k expression; omit for the whole suite.",
      "timeout_s": "Give up after this many seconds."}),
    ("run_command", "Run a shell command in the repository root and return its exit status and output.",
     {"command": "The command line.", "timeout_s": "Give up after this many seconds.",
      "env": "Extra environment variables as an object of strings."}),
    ("git_diff", "Show the uncommitted changes of the working tree, or between two commits.",
     {"base": "Base commit (default: HEAD).", "paths": "Only these paths."}),
    ("git_commit", "Commit the staged changes with a message.",
     {"message": "The commit message: a summary line, a blank line, then details.",
      "amend": "Amend the previous commit instead of creating a new one."}),
    ("open_issue", "Read an issue of the project tracker: title, body and comments.",
     {"number": "The issue number."}),
    ("web_search", "Search public documentation and return the titles, addresses and excerpts of the best pages.",
     {"query": "A few keywords.", "site": "Only pages of this site."}),
    ("ask_user", "Ask the user a clarifying question and wait for the answer.",
     {"question": "One short question."}),
]

INSTRUCTIONS = (
    "You are a careful software engineering agent working in a Python repository. You can call the tools "
    "described below by answering with one JSON object {\"tool\": NAME, \"arguments\": {...}} and nothing "
    "else; the result of the call comes back as the next user message. Read code before you change it, make "
    "the smallest change that solves the task, run the tests after every change, and explain what you did in "
    "two or three sentences when you are done. Never invent file contents, never delete data you were not "
    "asked to delete, and ask the user when the task is ambiguous. Keep answers short.")

ASKS = [
    "The test test_{c}_parser fails with a KeyError on an empty config. Find the cause.",
    "Show me the function that loads the config in module_{c}.py.",
    "Fix it so that an empty config gives the defaults, then run the tests.",
    "Now add a test for the empty config case and commit with a clear message.",
    "Summarise what you changed and why, in two sentences.",
]


TOOL_LINES = 16  # lines of a tool result by default (~400 tokens); the results JSONs before --tool-lines used it


def tool_result(c: int, turn: int, lines: int = TOOL_LINES) -> str:
    """A made-up file listing, as a read_file call would return it: each conversation's own
    history grows by a few hundred tokens a turn, as an agent's does."""
    body = []
    for i in range(lines // 2):
        body.append(f"{2 * i + 1:4d}  def handler_{c}_{turn}_{i}(config: dict, key: str = 'k{i}') -> int:")
        body.append(f"{2 * i + 2:4d}      return len(config.get(key, [])) + {i * 7 + c * 3 + turn}")
    return f"Result of read_file(path='module_{c}.py'):\n" + "\n".join(body) + "\n\n"


def system_prompt(tokenizer, target: int) -> str:
    """INSTRUCTIONS and tool schemas, the schemas repeated with numbered variants until ~target tokens."""
    def schema(name, desc, params, k):
        return {"type": "function", "function": {
            "name": name if not k else f"{name}_v{k + 1}", "description": desc,
            "parameters": {"type": "object", "properties": {p: {"type": "string", "description": d}
                                                            for p, d in params.items()},
                           "required": list(params)[:1]}}}

    tools, k = [], 0
    while True:
        for name, desc, params in TOOLS:
            tools.append(schema(name, desc, params, k))
            text = INSTRUCTIONS + "\n\n# Tools\n" + "\n".join(json.dumps(t) for t in tools)
            if len(tokenizer.encode(text)) >= target:
                return text
        k += 1


@dataclass
class Request:
    setup: str
    phase: str  # one of PHASES
    conversation: int
    turn: int
    ttft_s: float
    total_s: float
    prompt_tokens: int
    cached_tokens: int
    text: str = field(repr=False, default="")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """One server process on 127.0.0.1 (promptvault serve or mlx_lm.server)."""

    def __init__(self, argv: list[str], log: Path):
        self.argv, self.log, self.proc, self.port = argv, log, None, 0

    def start(self, timeout: float = 600) -> None:
        self.port = _port()
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen([*self.argv, "--host", "127.0.0.1", "--port", str(self.port)],
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PromptvaultError(f"{self.argv[0]} exited with {self.proc.returncode} (log: {self.log})")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        else:
            self.stop()
            raise PromptvaultError(f"server did not start within {timeout:.0f} s (log: {self.log})")
        chat(self.port, [{"role": "user", "content": "Hi"}], 1)  # warm-up, not counted

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=600)  # a graceful stop finishes the store of the last answer
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def chat(port: int, messages: list[dict], max_tokens: int) -> tuple[float, float, str, dict]:
    """One streamed chat completion: (TTFT, total seconds, text, usage)."""
    body = {"model": "default_model", "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise PromptvaultError(f"server on port {port} answered {resp.status}: {resp.read()[:300]!r}")
    ttft, pieces, usage = None, [], {}
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                pieces.append(content)
    total = time.perf_counter() - t0
    return (ttft if ttft is not None else total), total, "".join(pieces), usage


PHASES = ("before restart", "after restart", "later turns")


def phase_of(turn: int, restart_after: int) -> str:
    """Before the restart; the first turn of each conversation after it (what a restart costs:
    mlx_lm.server has lost its cache); the turns after that (its RAM cache is warm again)."""
    return PHASES[0] if turn < restart_after else PHASES[1] if turn == restart_after else PHASES[2]


def replay(setup: str, servers: list[_Server], system: str, conversations: int, turns: int,
           max_tokens: int, tool_lines: int = TOOL_LINES, log=None) -> list[Request]:
    """The trace against `servers` (requests alternate between them), restarting them midway."""
    history = [[{"role": "system", "content": system}] for _ in range(conversations)]
    restart_after = (turns + 1) // 2
    out, n = [], 0
    for s in servers:
        s.start()
    try:
        for turn in range(turns):
            if turn == restart_after:
                for s in servers:
                    s.stop()
                for s in servers:
                    s.start()
            phase = phase_of(turn, restart_after)
            for c in range(conversations):
                ask = ASKS[turn % len(ASKS)].format(c=c)
                history[c].append({"role": "user", "content": (tool_result(c, turn, tool_lines) if turn else "") + ask})
                server = servers[n % len(servers)]
                n += 1
                ttft, total, text, usage = chat(server.port, history[c], max_tokens)
                history[c].append({"role": "assistant", "content": text})
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                out.append(Request(setup, phase, c, turn, ttft, total, usage.get("prompt_tokens", 0), cached, text))
                if log:
                    log(f"{setup}: conversation {c} turn {turn + 1} ({phase}): TTFT {ttft:.2f} s, "
                        f"{cached}/{usage.get('prompt_tokens', 0)} cached")
    finally:
        for s in servers:
            s.stop()
    return out


def summarize(requests: list[Request]) -> list[dict]:
    rows = []
    for setup in dict.fromkeys(r.setup for r in requests):
        for phase in (*PHASES, "all"):
            rs = [r for r in requests if r.setup == setup and (phase == "all" or r.phase == phase)]
            if not rs:
                continue
            ttft = np.array([r.ttft_s for r in rs])
            rows.append({"setup": setup, "phase": phase, "requests": len(rs),
                         "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p95_s": float(np.percentile(ttft, 95)),
                         "cached_share": sum(r.cached_tokens for r in rs) / max(1, sum(r.prompt_tokens for r in rs)),
                         "time_s": float(sum(r.total_s for r in rs))})
    return rows


def run_serve_bench(model: str | None, *, conversations: int, turns: int, system_tokens: int, max_tokens: int,
                    setups: list[str], tool_lines: int = TOOL_LINES, workdir: str | None = None, log=None) -> dict:
    from promptvault.models import load_model

    lm = load_model(model)
    system = system_prompt(lm.tokenizer, system_tokens)
    exe = [str(Path(sys.executable).parent / "promptvault")]  # the console script installed with this package
    results: list[Request] = []
    with tempfile.TemporaryDirectory(dir=workdir, prefix="bench-serve-") as tmp:
        root = Path(tmp)
        model_args = ["--model", model] if model else []
        for setup in setups:
            if setup == "promptvault":
                servers = [_Server([*exe, "serve", *model_args, "--vault", str(root / "vault-1")], root / "pv.log")]
            elif setup == "mlx_lm.server":
                servers = [_Server([sys.executable, "-m", "mlx_lm.server", "--model", str(lm.path)], root / "mlx.log")]
            elif setup == "promptvault x2":
                servers = [_Server([*exe, "serve", *model_args, "--vault", str(root / "vault-2")], root / f"pv2-{i}.log")
                           for i in range(2)]
            else:
                raise PromptvaultError(f"unknown setup {setup!r} (choose from: {', '.join(SETUPS)})")
            results += replay(setup, servers, system, conversations, turns, max_tokens, tool_lines, log)
    return {"model": lm.name, "system_prompt_tokens": len(lm.tokenizer.encode(system)),
            "conversations": conversations, "turns": turns, "max_tokens": max_tokens, "tool_lines": tool_lines,
            "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
            "load_average": list(os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "rows": summarize(results), "requests": [{k: v for k, v in vars(r).items() if k != "text"} for r in results]}


SETUPS = ("promptvault", "mlx_lm.server", "promptvault x2")


def format_table(result: dict) -> str:
    from promptvault.tables import format_table as table

    head = (f"{result['model']}: {result['conversations']} conversations x {result['turns']} turns, system prompt "
            f"{result['system_prompt_tokens']} tokens, tool results of {result.get('tool_lines', TOOL_LINES)} lines, "
            f"{result['max_tokens']} new tokens per answer; "
            f"{result['machine']}, load average {', '.join(f'{x:.1f}' for x in result['load_average'])}, "
            f"{result['date']}")
    return head + "\n" + table(result["rows"])
