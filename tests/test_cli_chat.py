"""`promptvault chat` through a pseudo-terminal, typed as a person would (pexpect), and the
progress line `warm` draws on a terminal. Real SmolLM2-135M-Instruct, a real vault directory."""

import json
import os
import re
import shutil
import stat
import sys
from pathlib import Path

import pexpect
import pytest

from promptvault.prompting import encode_messages

REPORT = re.compile(r"\[reused (\d+)/(\d+) prompt tokens \((\w+)\), prefilled (\d+)")
TIMEOUT = 300  # two CPU cores shared with other work: model load + a few prefills


@pytest.fixture(scope="module")
def exe():
    path = shutil.which("promptvault", path=str(Path(sys.executable).parent))
    assert path, "the promptvault console script is not installed"
    return path


def spawn(exe, *args):
    child = pexpect.spawn(exe, [str(a) for a in args], env=dict(os.environ), encoding="utf-8", timeout=TIMEOUT,
                          dimensions=(24, 200))
    return child


def ask(child, text) -> tuple[int, int, str, int]:
    child.expect_exact(">> ")
    child.sendline(text)
    child.expect(REPORT)
    reused, total, tier, prefilled = child.match.groups()
    return int(reused), int(total), tier, int(prefilled)


def quit_(child):
    child.expect_exact(">> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


def test_chat_turns_and_sessions_restore_the_history_instead_of_prefilling(smollm, exe, tmp_path):
    vault = tmp_path / "v"
    common = ["--vault", vault, "--quality", "exact", "--max-tokens", 24, "--block-size", 32]
    child = spawn(exe, "chat", "--session", "trip", *common)
    reused1, total1, _, _ = ask(child, "What is the capital of France?")
    assert reused1 == 0 and total1 > 20
    # Second turn in the same process: the first prompt and its answer come from the vault.
    reused2, total2, tier2, prefilled2 = ask(child, "And of Italy?")
    quit_(child)
    session = vault / "sessions" / "trip.json"
    assert stat.S_IMODE(session.stat().st_mode) == 0o600
    messages = json.loads(session.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert "Paris" in messages[1]["content"]
    history1 = encode_messages(smollm.tokenizer, messages[:2], add_generation_prompt=False)
    assert tier2 in ("ram", "disk") and reused2 >= len(history1) - 2 and prefilled2 < 24

    # A new process resumes the session from the stored cache: nothing of it is prefilled again.
    child = spawn(exe, "chat", "--session", "trip", *common)
    child.expect("resumed session 'trip': 4 messages")
    reused3, total3, tier3, prefilled3 = ask(child, "And of Spain?")
    quit_(child)
    history2 = encode_messages(smollm.tokenizer, messages, add_generation_prompt=False)
    assert tier3 == "disk" and reused3 >= len(history2) - 2 and prefilled3 < 24
    assert len(json.loads(session.read_text())["messages"]) == 6

    # /reset starts over: a fresh conversation, its first prompt the first turn's again.
    child = spawn(exe, "chat", "--session", "trip", *common)
    child.expect_exact(">> ")
    child.sendline("/reset")
    child.expect_exact("(conversation cleared)")
    reused4, total4, _, _ = ask(child, "What is the capital of France?")
    quit_(child)
    assert total4 == total1 and reused4 >= 32  # at least the stored block with the system prompt
    assert len(json.loads(session.read_text())["messages"]) == 2


def test_chat_rejects_a_bad_session_name(exe, tmp_path):
    child = spawn(exe, "chat", "--session", "../escape", "--vault", tmp_path / "v")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1 and "error: session name" in child.before


def test_warm_progress_moves_per_prefill_step_on_a_terminal(smollm, exe, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text((Path(__file__).parents[1] / "examples" / "data" / "licenses.txt").read_text()[:9000])
    child = spawn(exe, "warm", doc, "--vault", tmp_path / "v", "--block-size", 128)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    counts = re.findall(r"warming \[[#-]+\] ([\d,]+)/([\d,]+) tokens", child.before)
    done = [int(d.replace(",", "")) for d, _ in counts]
    assert len(set(done)) >= 4 and done == sorted(done), done  # one redraw per prefill step (512 tokens on CPU)
    assert "tok/s" in child.before and "left" in child.before


def test_run_shows_prefill_progress_on_a_terminal_only_when_it_is_long(smollm, exe, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text((Path(__file__).parents[1] / "examples" / "data" / "licenses.txt").read_text()[:4000])
    args = ["run", "--context", doc, "-p", "Which license is this?", "--max-tokens", 1, "--no-vault"]
    child = spawn(exe, *args)  # ~850 tokens cold: a 512-token step takes seconds on 2 cores
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert re.search(r"prefill \[[#-]+\] [\d,]+/[\d,]+ tokens, [\d,]+ tok/s", child.before), child.before
    short = spawn(exe, "run", "-p", "Hi", "--max-tokens", 1, "--no-vault")
    short.expect(pexpect.EOF)
    assert "prefill [" not in short.before
