"""Issue T2.0: what used to lose stored data or store the wrong state, each reproduced on small
random-weight mlx-lm models (and the CLI where the bug was in a verb): recurrent saves, unsupported
cache classes, caps that wipe the vault, an emptied index, labels lost by a rebuild, and a miss
that did not say why."""

import json
import os
import sqlite3
import types

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlx_lm.models import mamba
from mlx_lm.models.cache import ChunkedKVCache, KVCache, RotatingKVCache, make_prompt_cache

from promptvault.cli import main
from promptvault.codec import CodecSpec, KVCodec
from promptvault.vault import Vault
from promptvault.vault.errors import CapTooSmallError, VaultSettingsError
from promptvault.vault.tiers import disk_usage
from test_vault_tiny import LOSSLESS_KV, last_logits, prompt, tiny_hybrid, tiny_llama


def tiny_mamba():
    """mlx-lm's mamba: every layer an ArraysCache with no token offset."""
    mx.random.seed(4)
    m = mamba.Model(mamba.ModelArgs(model_type="mamba", vocab_size=128, hidden_size=32, intermediate_size=64,
                                    state_size=8, num_hidden_layers=2, conv_kernel=4, use_bias=False,
                                    use_conv_bias=True, time_step_rank=4))
    mx.eval(m.parameters())
    return types.SimpleNamespace(model=m, fingerprint="tiny-mamba", tokenizer=None)


def _prefilled(lm, toks):
    cache = make_prompt_cache(lm.model)
    lm.model(mx.array([toks]), cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def test_save_of_purely_recurrent_state_prefills_instead_of_misplacing_it(tmp_path):
    lm = tiny_mamba()
    toks = prompt(16)
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        s = vault.save(lm, _prefilled(lm, toks), toks)  # the state is at 16: not block [0, 8)'s
        assert s.prefilled and s.written == 2  # so the prompt was prefilled again, every block end seen
        r = vault.restore(lm, toks[:8] + [3])
        assert r.tokens_reused == 8
        ref = last_logits(lm, toks[:8] + [3])
        assert mx.allclose(last_logits(lm, toks[:8] + [3], r.cache, 8), ref, atol=1e-4).item()


def test_hybrid_save_takes_from_the_cache_only_the_block_ending_where_it_is(tmp_path):
    lm = tiny_hybrid()
    toks = prompt(16)
    with Vault(tmp_path / "a", block_size=8, codec=LOSSLESS_KV) as vault:
        s = vault.save(lm, _prefilled(lm, toks), toks)  # block [0, 8) is not where the cache is
        assert s.prefilled and s.written == 2
    with Vault(tmp_path / "b", block_size=8, codec=LOSSLESS_KV) as vault:
        vault.warm(lm, toks[:8])
        s = vault.save(lm, _prefilled(lm, toks), toks)  # only [8, 16) was missing: the cache is at 16
        assert s.written == 1 and not s.prefilled
        longer = toks + [7]
        r = vault.restore(lm, longer)
        assert r.tokens_reused == 16
        assert mx.allclose(last_logits(lm, longer, r.cache, 16), last_logits(lm, longer), atol=1e-4).item()


def test_save_of_a_non_default_cache_stores_the_default_one(tmp_path):
    lm = tiny_llama()
    toks = prompt(20)
    ring = [RotatingKVCache(64, keep=4) for _ in lm.model.layers]  # what max_kv_size gives: not the default
    lm.model(mx.array([toks]), cache=ring)
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        s = vault.save(lm, ring, toks)
        assert s.prefilled and s.written == 3
        longer = toks + [1]
        r = vault.restore(lm, longer)
        assert r.tokens_reused == 20
        assert mx.allclose(last_logits(lm, longer, r.cache, 20), last_logits(lm, longer), atol=1e-4).item()


def test_save_refuses_a_cache_shorter_than_the_tokens(tmp_path):
    lm = tiny_llama()
    toks = prompt(20)
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        with pytest.raises(VaultSettingsError, match="holds 12 tokens, fewer than the 20"):
            vault.save(lm, _prefilled(lm, toks[:12]), toks)
        assert vault.index.all_chunks() == []


def _chunked_model():
    lm = tiny_llama()
    lm.model.make_cache = lambda: [KVCache(), ChunkedKVCache(16)]  # as llama4's chunked attention
    return lm


def test_unsupported_cache_class_is_a_miss_for_restore_and_one_line_for_warm(tmp_path, caplog):
    lm = _chunked_model()
    toks = prompt(20)
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        r = vault.restore(lm, toks)
        assert r.tokens_reused == 0 and type(r.cache[1]) is ChunkedKVCache
        assert "cannot store a" in caplog.text and "ChunkedKVCache" in caplog.text
        for store in (lambda: vault.warm(lm, toks), lambda: vault.save(lm, make_prompt_cache(lm.model), toks)):
            with pytest.raises(Exception, match="cannot store a .*ChunkedKVCache") as err:
                store()
            assert "\n" not in str(err.value)


def _filled(path, **kw):
    lm = tiny_llama()
    with Vault(path, block_size=8, codec=LOSSLESS_KV, **kw) as vault:
        vault.warm(lm, prompt(40), label="doc")
        vault.warm(lm, prompt(40, 1), label="other")
        rows = vault.index.all_chunks()
    return lm, rows


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("args", [["gc", "--disk-cap", "1"], ["gc", "--disk-cap", "0"], ["gc", "--disk-cap", "100"],
                                  ["gc", "--max-bytes", "0"],
                                  ["config", "--disk-cap", "1"]])
def test_a_cap_below_one_block_is_refused_before_anything_is_evicted(tmp_path, args):
    _, rows = _filled(tmp_path)
    files = sorted(p.name for p in (tmp_path / "shards").rglob("*.safetensors"))
    res = _cli(*args, "--vault", tmp_path)
    assert res.exit_code == 1 and "smaller than one stored block" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "shards").rglob("*.safetensors")) == files
    with Vault(tmp_path) as vault:
        assert len(vault.index.all_chunks()) == len(rows) and len(vault.index.warmed()) == 2


def test_warm_with_a_tiny_cap_on_a_stored_prompt_is_refused(tmp_path):
    lm, rows = _filled(tmp_path)
    with pytest.raises(CapTooSmallError):
        Vault(tmp_path, disk_cap=1)
    with Vault(tmp_path) as vault:
        assert len(vault.index.all_chunks()) == len(rows)


def test_a_cap_that_would_evict_everything_needs_evict_all(tmp_path):
    _, rows = _filled(tmp_path)
    largest = max(r["bytes"] for r in rows)
    res = _cli("gc", "--max-bytes", largest, "--vault", tmp_path)
    assert res.exit_code == 1 and "would evict every stored chunk" in res.output and "--evict-all" in res.output
    with Vault(tmp_path) as vault:
        assert len(vault.index.all_chunks()) == len(rows)
    res = _cli("gc", "--max-bytes", largest, "--evict-all", "--vault", tmp_path, "--json")
    assert res.exit_code == 0, res.output
    with Vault(tmp_path) as vault:
        assert len(vault.index.all_chunks()) < len(rows)


def test_caps_stored_in_the_vault_are_used_by_later_commands(tmp_path):
    lm, rows = _filled(tmp_path)
    total = disk_usage(tmp_path) - 2 * max(r["bytes"] for r in rows)
    res = _cli("config", "--disk-cap", total, "--ram-cap", "1M", "--vault", tmp_path, "--json")
    assert res.exit_code == 0, res.output
    with Vault(tmp_path) as vault:
        assert (vault.disk.cap, vault.ram.cap) == (total, 2**20)
        assert vault.gc().evicted > 0  # the stored cap is enforced without being passed again
    assert '"disk_cap": ' + str(total) in _cli("config", "--vault", tmp_path, "--json").output
    assert _cli("config", "--disk-cap", "none", "--vault", tmp_path).exit_code == 0
    with Vault(tmp_path) as vault:
        assert vault.disk.cap is None


def test_an_index_truncated_to_nothing_is_rebuilt_with_its_labels(tmp_path):
    lm, rows = _filled(tmp_path)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"index.sqlite{suffix}").unlink(missing_ok=True)
    (tmp_path / "index.sqlite").write_bytes(b"")
    res = _cli("verify", "--vault", tmp_path, "--json")
    assert res.exit_code == 0 and '"checked": %d' % len(rows) in res.output
    with Vault(tmp_path, codec=LOSSLESS_KV) as vault:
        assert len(vault.index.all_chunks()) == len(rows)
        assert sorted(w["label"] for w in vault.index.warmed()) == ["doc", "other"]
        assert vault.restore(lm, prompt(40)).tokens_reused == 39


def test_verify_adopts_shards_the_index_does_not_list(tmp_path):
    _, rows = _filled(tmp_path)
    with sqlite3.connect(tmp_path / "index.sqlite") as db:
        db.execute("DELETE FROM chunks WHERE key = ?", (rows[0]["key"],))
    with Vault(tmp_path) as vault:
        report = vault.verify()
        assert report.adopted == [rows[0]["key"]] and report.checked == len(rows)
        assert vault.index.chunk(rows[0]["key"]) is not None


@pytest.mark.parametrize("how", ["reindex", "corrupt index"])
def test_labels_hits_and_times_survive_an_index_rebuild(tmp_path, how):
    lm, rows = _filled(tmp_path)
    with Vault(tmp_path, codec=LOSSLESS_KV) as vault:
        for _ in range(2):
            assert vault.restore(lm, prompt(40)).tokens_reused == 39
        before = {r["key"]: vault.index.chunk(r["key"]) for r in rows}
        warmed = [(w["label"], w["last_key"], w["created"]) for w in vault.index.warmed()]
    if how == "reindex":
        assert _cli("reindex", "--vault", tmp_path).exit_code == 0
    else:
        (tmp_path / "index.sqlite").write_bytes(b"garbage" * 100)
    with Vault(tmp_path) as vault:
        assert [(w["label"], w["last_key"], w["created"]) for w in vault.index.warmed()] == warmed
        after = {r["key"]: vault.index.chunk(r["key"]) for r in rows}
    assert _cli("inspect", "doc", "--vault", tmp_path).exit_code == 0
    for key, row in before.items():
        assert after[key]["created"] == pytest.approx(row["created"])
        if how == "reindex":  # the old index was readable: hits come along
            assert (after[key]["hits"], after[key]["last_used"]) == (row["hits"], row["last_used"])
    used = {k for k, r in before.items() if r["hits"]}
    # the eviction order (least recently used first) is the same: restored chunks stay newest
    assert min(after[k]["last_used"] for k in used) >= max(after[k]["last_used"] for k in before if k not in used)


def test_rm_of_an_unknown_label_fails_and_removes_nothing(tmp_path):
    _, rows = _filled(tmp_path)
    res = _cli("rm", "nosuch", "--vault", tmp_path)
    assert res.exit_code == 1 and "no warmed prompt is labelled 'nosuch'" in res.output
    with Vault(tmp_path) as vault:
        assert len(vault.index.all_chunks()) == len(rows)


def test_gc_can_empty_the_quarantine(tmp_path):
    lm, rows = _filled(tmp_path)
    path = tmp_path / "shards" / rows[0]["file"]
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    assert _cli("verify", "--vault", tmp_path).exit_code == 1
    assert len(os.listdir(tmp_path / "quarantine")) == 1
    res = _cli("gc", "--empty-quarantine", "--vault", tmp_path, "--json")
    assert res.exit_code == 0 and '"quarantine_removed": 1' in res.output
    assert os.listdir(tmp_path / "quarantine") == []


def test_a_miss_says_when_another_namespace_holds_the_prompt(tmp_path, caplog):
    lm = tiny_llama()
    toks = prompt(30)
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        vault.warm(lm, toks)
    with Vault(tmp_path, codec=KVCodec(CodecSpec(4), CodecSpec(4))) as vault:
        r = vault.restore(lm, toks)
        assert r.tokens_reused == 0 and "another codec" in r.note and "another codec" in caplog.text
        assert "model" not in r.note.split("with", 1)[1]
        assert vault.restore(lm, prompt(30, 9)).note is None  # nobody holds this one


def test_ls_forgets_prompts_whose_chunks_were_evicted(tmp_path):
    _filled(tmp_path)  # "doc" then "other": doc's leaf is the least recently used chunk
    with Vault(tmp_path) as vault:
        vault.index.checkpoint()
        vault.disk.cap = disk_usage(tmp_path) - 1
        assert vault.gc().evicted >= 1
        kept = {w["label"] for w in vault.index.warmed()}
        assert all(vault.index.chunk(w["last_key"]) for w in vault.index.warmed())
    assert "doc" not in kept
    assert {w["label"] for w in json.loads(_cli("ls", "--vault", tmp_path, "--json").output)} == kept
