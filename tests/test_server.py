"""`promptvault serve` through the official `openai` and `anthropic` clients: one real server
process (SmolLM2, lossless codec, 16-token blocks so short prompts span several blocks) shared by
the tests of this file, restarted once by the last one."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import anthropic
import httpx
import openai
import pytest

from promptvault.server.stops import StopText
from server_process import EXE, LOSSLESS, Server

BLOCK = "16"
CAP = 400


@pytest.fixture(scope="module")
def server(smollm, tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    srv = Server(base / "vault", base / "server.log", "--block-size", BLOCK, "--max-tokens-cap", str(CAP),
                 *LOSSLESS).start()
    yield srv
    srv.stop()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def chat(server, text: str, max_tokens: int = 12, **kw):
    return client(server).chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": text}], max_tokens=max_tokens, **kw)


def test_stop_text_holds_back_a_possible_stop_across_pieces():
    stops = StopText(["END", "\n\n"])
    out = [stops.feed(p) for p in ["Hello E", "N", "ough\n", "\nmore"]]
    assert out == [("Hello ", False), ("", False), ("ENough", False), ("", True)]
    assert stops.matched == "\n\n" and StopText([]).feed("abc") == ("abc", False)
    tail = StopText(["xyz"])
    assert tail.feed("abx") == ("ab", False) and tail.flush() == "x"


def test_health_and_models(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert [m.id for m in client(server).models.list()] == ["SmolLM2-135M-Instruct"]


def test_chat_whole_then_streamed_reuses_the_shared_prefix(server):
    first = chat(server, "Name one colour of the rainbow.")
    assert first.choices[0].message.content and first.choices[0].finish_reason in ("stop", "length")
    assert first.usage.prompt_tokens > 32 and first.usage.completion_tokens >= 1
    stream = chat(server, "Name one planet of the solar system.", stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces).strip() and finish in ("stop", "length")
    # The template's system prompt and the start of the user turn are shared blocks.
    assert usage is not None and usage.prompt_tokens_details.cached_tokens >= 16
    assert usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


def test_the_next_turn_continues_from_the_live_cache_and_a_restart_from_the_vault(server):
    history = [{"role": "user", "content": "Name two colours of the rainbow."}]
    live_hits = server.log.read_text().count("(live)")
    first = client(server).chat.completions.create(model="smollm2", messages=history, max_tokens=8)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And one more?"}]
    second = client(server).chat.completions.create(model="smollm2", messages=history, max_tokens=8)
    # the whole first prompt and most of the answer come back, before anything reached the vault
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    deadline = time.monotonic() + 30  # the worker logs the source just after the answer
    while server.log.read_text().count("(live)") <= live_hits and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.log.read_text().count("(live)") > live_hits, "the second turn did not continue from memory"
    assert httpx.get(server.url + "/v1/cache/stats", timeout=60).json()["live"]["sequences"] >= 1
    history += [{"role": "assistant", "content": second.choices[0].message.content},
                {"role": "user", "content": "Thanks. One word: which is warmest?"}]
    server.stop()
    server.start()  # memory is gone: the graceful stop stored both answers
    third = client(server).chat.completions.create(model="smollm2", messages=history, max_tokens=4)
    assert third.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens - 16  # a block or less


def test_a_second_process_on_the_vault_gets_what_the_first_stored_once_idle(server, tmp_path):
    other = Server(server.vault, tmp_path / "other.log", "--block-size", BLOCK, *LOSSLESS).start()
    try:
        question = "Which ocean is the largest? One word."
        stores = server.log.read_text().count("new chunks of")
        first = chat(server, question, 4)
        deadline = time.monotonic() + 60  # the first process stores its answer once it is idle
        while server.log.read_text().count("new chunks of") == stores and time.monotonic() < deadline:
            time.sleep(0.2)
        there = chat(other, question, 4)
        assert there.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - int(BLOCK)
        assert there.choices[0].message.content == first.choices[0].message.content  # lossless
    finally:
        other.stop()


def test_completions_whole_streamed_and_stop(server):
    c = client(server)
    whole = c.completions.create(model="smollm2", prompt="The three primary colours are red,", max_tokens=8)
    assert whole.choices[0].text and whole.usage.completion_tokens >= 1
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="smollm2", prompt="The three primary colours are red,", max_tokens=8, stream=True) if ch.choices)
    assert streamed == whole.choices[0].text  # greedy, lossless: the restored prefix changes nothing
    cut = c.completions.create(model="smollm2", prompt="The three primary colours are red,", max_tokens=8,
                               stop=[whole.choices[0].text[3:6]])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == whole.choices[0].text[:3]


def test_text_matches_promptvault_run_before_and_after_a_cache_hit(server, tmp_path):
    question = "Why is the sky blue? One sentence."
    run = subprocess.run([EXE, "run", "-p", question, "--max-tokens", "16", "--vault", str(tmp_path / "v"),
                          "--block-size", BLOCK, *LOSSLESS, "--json"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    expected = json.loads(run.stdout)["text"]
    cold, warm = chat(server, question, 16), chat(server, question, 16)
    assert warm.usage.prompt_tokens_details.cached_tokens > cold.usage.prompt_tokens_details.cached_tokens
    assert cold.choices[0].message.content == expected
    assert warm.choices[0].message.content == expected


def test_anthropic_messages_whole_and_streamed(server):
    c = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=300)
    msg = c.messages.create(model="SmolLM2-135M-Instruct", max_tokens=10, system="Answer in one word.",
                            messages=[{"role": "user", "content": "What is frozen water called?"}])
    assert msg.content[0].type == "text" and msg.content[0].text
    assert msg.stop_reason in ("end_turn", "max_tokens") and msg.usage.output_tokens >= 1
    with c.messages.stream(model="SmolLM2-135M-Instruct", max_tokens=10, system="Answer in one word.",
                           messages=[{"role": "user", "content": "What is frozen water called?"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == msg.content[0].text
    assert final.usage.cache_read_input_tokens > 0


BAD = [
    ("/v1/chat/completions", b"{not json", 400, "invalid_json"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "model_not_found"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ("/v1/chat/completions", {"messages": []}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": CAP + 1}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": 3}, 400, None),
    ("/v1/completions", {"prompt": [1] * 8192, "max_tokens": 1}, 400, "context_length_exceeded"),
    ("/v1/completions", {"prompt": [1] * 8000, "max_tokens": CAP}, 400, "context_length_exceeded"),
    ("/v1/completions", {"prompt": ""}, 400, None),
    ("/v1/completions", {"prompt": "Hi", "n": 2}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, None),
    ("/v1/nowhere", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,code", BAD)
def test_bad_request_gets_its_status_and_an_openai_error(server, path, body, status, code):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=data, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if code:
        assert error["code"] == code


def test_bad_anthropic_request_gets_an_anthropic_error(server):
    c = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model="SmolLM2-135M-Instruct", max_tokens=5, messages=[{"role": "system", "content": "x"}])
    assert e.value.body["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/messages", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["type"] == "error" and "max_tokens" in r.json()["error"]["message"]


def _chunks(server) -> int:
    return sum(n["chunks"] for n in httpx.get(server.url + "/v1/cache/stats", timeout=60).json()["namespaces"])


def test_disconnect_mid_stream_stops_generation_and_stores_nothing(server):
    before = _chunks(server)
    body = {"messages": [{"role": "user", "content": "Write a very long story about a dragon who learns to bake bread."}],
            "max_tokens": CAP, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(12)) if line.startswith("data:")]
        assert len(got) >= 5  # a few tokens arrived, then the client hangs up
    assert server.wait_for_log("client went away"), "the generation went on after the client left"
    assert _chunks(server) == before  # the stats call queues behind the stopped generation: nothing stored
    assert chat(server, "Say hi.", 4).choices[0].message.content  # the MLX thread is free again


def test_sixteen_concurrent_clients_are_all_answered(server):
    results, errors = {}, []

    def ask(i):
        try:
            results[i] = chat(server, f"Give me a word that rhymes with number {i}.", 4)
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(repr(e))

    t0 = time.monotonic()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors and sorted(results) == list(range(16))
    assert all(r.choices[0].message.content is not None and r.usage.completion_tokens >= 1 for r in results.values())
    assert time.monotonic() - t0 < 600


def test_restart_keeps_every_stored_prefix(server):
    earlier = "Name one colour of the rainbow."
    last = "List three fruits that are red, one per line, with one word about each."
    chat(server, last, 2)
    server.stop()  # SIGTERM right after the answer: the graceful stop finishes storing it first
    server.start()
    for question in (earlier, last):
        first = chat(server, question)
        assert first.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 16, question
