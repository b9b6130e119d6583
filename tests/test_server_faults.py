"""`promptvault serve` under stress: an API key, a full queue (503), and kill -9 during the store
after an answer (the vault verifies clean and the next start serves). One server process with
the default (lossy) codec, so each store spends time encoding."""

from __future__ import annotations

import json
import subprocess
import threading

import anthropic
import httpx
import openai
import pytest

from server_process import EXE, Server

KEY = "s3cret-key"
# ~300 tokens of user text: ~20 blocks of 16 to encode and write after the answer.
LONG = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog." for i in range(20))


@pytest.fixture(scope="module")
def server(smollm, tmp_path_factory):
    base = tmp_path_factory.mktemp("serve-faults")
    srv = Server(base / "vault", base / "server.log", "--block-size", "16", "--api-key", KEY, "--max-queue", "1").start()
    yield srv
    srv.kill()


def test_api_key_required_on_v1_routes_only(server):
    assert httpx.get(server.url + "/health").status_code == 200
    for headers in ({}, {"authorization": "Bearer wrong"}, {"x-api-key": KEY + "x"}):
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0).chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert ok.choices[0].message.content is not None
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model="smollm2", max_tokens=3, messages=[{"role": "user", "content": "Hi"}])
    msg = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0).messages.create(
        model="smollm2", max_tokens=3, messages=[{"role": "user", "content": "Hi"}])
    assert msg.content[0].text is not None


def test_full_queue_answers_503_with_a_json_error(server):
    statuses, bodies = [], []

    def ask(i):
        r = httpx.post(server.url + "/v1/chat/completions", headers={"x-api-key": KEY}, timeout=300,
                       json={"messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 8})
        statuses.append(r.status_code)
        bodies.append(r.json())

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert len(statuses) == 6 and set(statuses) == {200, 503}, statuses
    busy = [b for s, b in zip(statuses, bodies) if s == 503]
    assert all(b["error"]["code"] == "queue_full" for b in busy)


def test_kill_during_store_leaves_the_vault_clean_and_the_next_start_serves(server):
    ask = {"messages": [{"role": "user", "content": LONG + " Which item is first?"}], "max_tokens": 1}
    r = httpx.post(server.url + "/v1/chat/completions", headers={"x-api-key": KEY}, json=ask, timeout=300)
    assert r.status_code == 200
    assert server.wait_for_log("storing"), "the answer was never stored"  # once the server is idle
    server.kill()  # the answer is out; the store of its ~20 blocks has just begun
    check = subprocess.run([EXE, "verify", "--vault", str(server.vault), "--json"], capture_output=True, text=True,
                           timeout=300)
    assert check.returncode == 0, check.stderr
    report = json.loads(check.stdout)
    assert report["corrupt"] == 0 and report["missing"] == 0
    server.start()
    again = httpx.post(server.url + "/v1/chat/completions", headers={"x-api-key": KEY}, json=ask, timeout=300)
    assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] is not None
    third = httpx.post(server.url + "/v1/chat/completions", headers={"x-api-key": KEY}, json=ask, timeout=300)
    assert third.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= third.json()["usage"]["prompt_tokens"] - 16


def test_delete_cache_removes_a_label_or_everything(server):
    headers = {"x-api-key": KEY}
    r = httpx.delete(server.url + "/v1/cache", params={"label": "no-such-label"}, headers=headers, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "label_not_found"
    assert httpx.delete(server.url + "/v1/cache", headers=headers, timeout=60).json()["removed_chunks"] > 0
    stats = httpx.get(server.url + "/v1/cache/stats", headers=headers, timeout=60).json()
    assert sum(n["chunks"] for n in stats["namespaces"]) == 0 and stats["ram_chunks"] == 0
    ask = {"messages": [{"role": "user", "content": LONG + " Which item is first?"}], "max_tokens": 1}
    again = httpx.post(server.url + "/v1/chat/completions", headers=headers, json=ask, timeout=300).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
