"""Vault.warm in large prefill steps with a background shard writer (small random-weight models).

A large step rounds differently from block-by-block prefill (matmul rounding depends on the
number of rows: measured here, even layer 0 differs by ~1e-7), so the reference for what warm
stores is mlx-lm's own prefill of the prompt in the same steps, captured losslessly."""

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from promptvault.vault import Vault, caches
from promptvault.vault.errors import VaultPathError
from promptvault.vault.shards import read_shard
from test_vault_tiny import LOSSLESS_KV, last_logits, prompt, tiny_gemma, tiny_hybrid, tiny_llama


def _stored(vault) -> list[dict]:
    """Every stored chunk's arrays (without its token ids), in token order."""
    rows = sorted((vault.index.chunk(r["key"]) for r in vault.index.all_chunks()), key=lambda r: r["position"])
    out = []
    for r in rows:
        arrays = read_shard(vault.shards / r["file"]).arrays
        arrays.pop("_tokens")
        out.append(arrays)
    return out


def _prefilled_blocks(lm, toks, block, step) -> list[dict]:
    """mlx-lm's prefill in `step`-token steps, each step's blocks captured losslessly right after it."""
    cache, out = make_prompt_cache(lm.model), []
    for s in range(0, len(toks), step):
        e = min(s + step, len(toks))
        lm.model(mx.array([toks[s:e]]), cache=cache)
        spans = [(a, min(a + block, e)) for a in range(s, e, block)]
        out += [p.arrays for p in caches.encode_blocks(cache, spans, LOSSLESS_KV, at=e)]
    return out


def _equal(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(mx.array_equal(x[k], y[k]).item() for k in x) for x, y in zip(a, b))


@pytest.mark.parametrize("make,block,step,steps", [(tiny_llama, 8, 16, [16, 32, 45]),
                                                   (tiny_gemma, 4, None, [12, 24, 36, 45])], ids=["kv", "rings"])
def test_large_step_warm_stores_what_mlx_lm_prefill_in_those_steps_holds(tmp_path, make, block, step, steps):
    """KV layers: steps of 16 tokens, two blocks each. Gemma's rings (window 12, keep 0): the
    default step is cut to 12 tokens, three blocks each. The blocks stored equal (bit for bit, lossless) those of mlx-lm's
    prefill in the same steps; a per-block warm still equals a per-block prefill; a restore
    continues exactly as that prefill does."""
    lm = make()
    toks = prompt(45)
    seen = []
    with Vault(tmp_path / "large", block_size=block, codec=LOSSLESS_KV) as vault:
        res = vault.warm(lm, toks, progress=lambda done, total: seen.append(done), step=step)
        assert seen == steps and res.written == res.chunks == -(-45 // block)
        large = _stored(vault)
        assert _equal(large, _prefilled_blocks(lm, toks, block, steps[0]))
        # restore the first two steps' blocks, prefill the rest in the same steps: as a cold run does
        cut = steps[1]
        r = vault.restore(lm, toks[:cut] + [(toks[cut] + 1) % 128])
        assert r.tokens_reused == cut
        cold = make_prompt_cache(lm.model)
        for s in range(0, cut, steps[0]):
            lm.model(mx.array([toks[s:min(s + steps[0], cut)]]), cache=cold)
        assert mx.array_equal(last_logits(lm, toks, r.cache, cut), last_logits(lm, toks, cold, cut)).item()
    with Vault(tmp_path / "per-block", block_size=block, codec=LOSSLESS_KV) as vault:
        vault.warm(lm, toks, step=block)
        small = _stored(vault)
        assert _equal(small, _prefilled_blocks(lm, toks, block, block))
    # the same blocks up to rounding (a different step changes the rows of every matmul)
    assert all(mx.allclose(x[k], y[k], atol=1e-4).item() for x, y in zip(large, small) for k in x)


@pytest.mark.parametrize("make,steps", [(tiny_llama, [45]), (tiny_hybrid, [8, 16, 24, 32, 40, 45])],
                         ids=["kv", "recurrent"])
def test_default_steps(tmp_path, make, steps):
    """KV layers: the whole prompt in one step (up to the default step); recurrent state (a
    snapshot of "now"): one block per step, so every block end is seen."""
    seen = []
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        vault.warm(make(), prompt(45), progress=lambda done, total: seen.append(done))
    assert seen == steps


def test_a_step_is_whole_blocks(tmp_path):
    seen = []
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        vault.warm(tiny_llama(), prompt(45), progress=lambda done, total: seen.append(done), step=20)
    assert seen == [16, 32, 45]


def test_a_write_error_in_the_writer_is_one_error_with_earlier_chunks_intact(tmp_path):
    """Chunk 3's fan-out directory cannot be made (a file has its name): the background writer
    fails there, warm raises one VaultPathError, chunks 0-2 are stored and indexed, nothing after
    them is on disk, and the same warm completes once the obstacle is gone."""
    lm, toks = tiny_llama(), prompt(45)
    with Vault(tmp_path / "probe", block_size=8, codec=LOSSLESS_KV) as vault:
        vault.warm(lm, toks)
        keys = [r["key"] for r in sorted((vault.index.chunk(r["key"]) for r in vault.index.all_chunks()),
                                         key=lambda r: r["position"])]
    assert len(keys) == 6 and keys[3][:2] not in {k[:2] for k in keys[:3] + keys[4:]}
    path = tmp_path / "v"
    with Vault(path, block_size=8, codec=LOSSLESS_KV) as vault:
        obstacle = vault.shards / keys[3][:2]
        obstacle.write_bytes(b"not a directory")
        with pytest.raises(VaultPathError) as err:
            vault.warm(lm, toks)
        assert "\n" not in str(err.value) and "after 3 new chunks" in str(err.value)
        assert {r["key"] for r in vault.index.all_chunks()} == set(keys[:3])
        files = {p.name.removesuffix(".safetensors") for p in vault.shards.rglob("*") if p.is_file()}
        assert files == set(keys[:3]) | {obstacle.name}  # no temp file, nothing unindexed
        assert vault.verify().bad == []
        r = vault.restore(lm, toks)
        assert r.tokens_reused == 24
        obstacle.unlink()
        again = vault.warm(lm, toks)
        assert (again.tokens_reused, again.written) == (24, 3)
        assert vault.restore(lm, toks).tokens_reused == 44
