"""Several real `promptvault` processes on one vault at once: overlapping prompts warmed and run
concurrently (the same chunks written by several processes), and writers under a disk cap.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from test_reliability_common import (BLOCK, CODEC, EXE, LOSSLESS, QUESTION, cold_text, is_long, pv, record,
                                     shard_files, temp_files, text, tokens, doc_tokens)
from promptvault.vault import Vault
from promptvault.vault.shards import read_shard
from promptvault.vault.tiers import disk_usage
from promptvault.vault.keys import block_keys

VARIANTS = 4


def _prompts(root: Path, n: int, common: str) -> list[Path]:
    out = []
    for k in range(n):
        p = root / f"p{k}.txt"
        p.write_text(common + text(2500 + 700 * k, 350))
        out.append(p)
    return out


def _spawn(script: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_processes_warming_and_running_overlapping_prompts(smollm, tmp_path, request):
    n = 8 if is_long(request) else 4
    lm = smollm
    prompts = _prompts(tmp_path, VARIANTS, text(0, 600))  # every prompt shares ~140 tokens
    questions = []
    for p in prompts:
        q = p.with_suffix(".q.txt")
        q.write_text(p.read_text() + QUESTION)
        questions.append(q)
    vault = tmp_path / "vault"
    common = f"--vault {vault} --block-size {BLOCK} {' '.join(LOSSLESS)}"
    procs = []
    for i in range(n):
        warm, run = prompts[i % VARIANTS], questions[(i + 1) % VARIANTS]
        procs.append(_spawn(f"{EXE} warm {warm} {common} --json && "
                            f"{EXE} run --prompt-file {run} --max-tokens 4 {common} --json"))
    outs = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    for rc, out, err in outs:
        assert rc == 0 and "Traceback" not in err and "error" not in err, err
    # Every run's answer equals the cold answer (lossless), whatever it reused.
    for i, (_, out, _) in enumerate(outs):
        answer = json.loads(out[out.index("{\n \"text\""):])
        q_toks = tokens(lm, questions[(i + 1) % VARIANTS].read_text())
        assert answer["text"] == cold_text(lm, q_toks)[: len(answer["text"])] and answer["generation_tokens"] == 4
    # Index and files agree exactly; nothing lost, nothing duplicated, no temp files left.
    with Vault(vault, codec=CODEC) as v:
        ns = v.namespace(lm)
        rows = v.index.all_chunks()
        expected = set()
        for k in range(VARIANTS):
            for path in (prompts[k], questions[k]):
                if path in prompts[: min(n, VARIANTS)] or path in [questions[(i + 1) % VARIANTS] for i in range(n)]:
                    toks = (doc_tokens if path in prompts else tokens)(lm, path.read_text())
                    expected |= set(block_keys(ns.digest, toks, v.block_size, tail=True))
        report = v.verify()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys))
    assert {r["file"] for r in rows} == shard_files(vault)
    assert not temp_files(vault)
    assert set(keys) >= expected, len(expected - set(keys))
    assert report.bad == []
    record("concurrent warm + run", injected=0, detected=0, repaired=0, wrong_outputs=0, data_lost=0,
           processes=n, operations=2 * n, chunks=len(keys))


def test_disk_cap_holds_under_concurrent_writers(smollm, tmp_path, request):
    n = 8 if is_long(request) else 4
    prompts = _prompts(tmp_path, n, "")
    vault = tmp_path / "vault"
    # One block's size with the default codec, measured on a scratch vault.
    probe = tmp_path / "probe"
    pv("warm", prompts[0], "--vault", probe, "--block-size", BLOCK, check=True)
    with Vault(probe) as v:
        block = max(r["bytes"] for r in v.index.all_chunks())
        one_prompt = disk_usage(probe)
    cap = one_prompt * 2  # room for about two of the n prompts
    procs = [_spawn(f"{EXE} warm {p} --vault {vault} --block-size {BLOCK} --disk-cap {cap} --json") for p in prompts]
    outs = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    for rc, _, err in outs:
        assert rc == 0 and "Traceback" not in err, err
    used = disk_usage(vault)
    evicted = sum(json.loads(out)["prompts"][0]["evicted_chunks"] for _, out, _ in outs)
    assert evicted > 0
    assert used <= cap + block, (used, cap, block)
    with Vault(vault) as v:
        rows = v.index.all_chunks()
        assert v.verify().bad == []
    assert {r["file"] for r in rows} == shard_files(vault) and not temp_files(vault)
    record("disk cap, concurrent writers", injected=0, detected=0, repaired=0, wrong_outputs=0, data_lost=0,
           processes=n, cap_bytes=cap, used_bytes=used, block_bytes=block, evicted=evicted)


def test_lossy_concurrent_warms_keep_one_set_of_bytes_per_chunk(smollm, tmp_path, request):
    """The default (lossy) codec: a process that restored the shared prefix from its lossy copy
    computes other bytes for the later blocks than one that prefilled them, so two writers of
    one key disagree. The first complete file must win and the index must agree with it: no
    chunk quarantined that nothing damaged, each stored once, each prompt restorable in full.
    (Lossless text equality hid this: both writers computed the same bytes.)"""
    import random

    rounds, n = (20, 8) if is_long(request) else (1, 4)
    base = text(0, 1000)
    prompts = []
    for k in range(n):
        p = tmp_path / f"q{k}.txt"
        p.write_text(base + f" Question {k}: " + text(3000 + 500 * k, 120))
        prompts.append(p)
    quarantined = chunks = 0
    for r in range(rounds):
        rng = random.Random(r)
        vault = tmp_path / f"vault{r}"
        procs = [_spawn(f"sleep {rng.uniform(0, 6):.2f}; {EXE} warm {p} --vault {vault} --block-size {BLOCK} --json")
                 for p in prompts]
        outs = [(p.wait(timeout=900), *p.communicate()) for p in procs]
        for rc, _, err in outs:
            assert rc == 0 and "Traceback" not in err, err
        with Vault(vault) as v:
            rows = v.index.all_chunks()
            report = v.verify()
            assert report.bad == []
            assert report.missing == [] and report.adopted == []
            assert not (vault / "quarantine").exists() or not any((vault / "quarantine").iterdir())
            for row in rows:  # the index agrees with the file that won
                assert read_shard(vault / "shards" / row["file"]).checksum == row["checksum"]
            for p in prompts:
                toks = doc_tokens(smollm, p.read_text())  # what `warm FILE` stored
                res = v.restore(smollm, toks)
                assert (res.tokens_reused, res.quarantined, res.missing) == (len(toks) - 1, [], [])
        keys = [r["key"] for r in rows]
        assert len(keys) == len(set(keys)) and {r["file"] for r in rows} == shard_files(vault)
        assert not temp_files(vault)
        quarantined += len(report.bad)
        chunks += len(keys)
    record("concurrent lossy warms", injected=0, detected=0, repaired=0, wrong_outputs=0, data_lost=quarantined,
           processes=n, rounds=rounds, chunks=chunks)
