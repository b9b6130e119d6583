"""Shard format 2 (layer groups, aligned single-buffer files) and format 1 compatibility.

Format 1 fixtures (tests/data/vault_v1, made by the code before format 2) must restore to the
very bits that code restored; a grouped (stacked) encode must restore to the same bits as the
per-layer encode it replaces; a chunk file holds a handful of tensors whatever the depth."""

import json
import logging
import shutil
import types
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache
from safetensors.numpy import load_file

from promptvault.vault import Vault, caches
from promptvault.vault.vault import DEFAULT_CODEC
from test_vault_tiny import prompt, tiny_gemma, tiny_hybrid, tiny_llama

DATA = Path(__file__).parent / "data" / "vault_v1"


def _state(cache):
    out = {}
    for i, c in enumerate(cache):
        for k, a in tree_flatten(c.state):
            if isinstance(a, mx.array):
                out[f"l{i}.{k}"] = np.asarray(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)
        out[f"l{i}.offset"] = np.array(getattr(c, "offset", -1))
    return out


@pytest.mark.parametrize("name,make", [("llama", tiny_llama), ("gemma", tiny_gemma), ("hybrid", tiny_hybrid)])
def test_format1_vault_restores_the_same_bits(tmp_path, caplog, name, make):
    shutil.copytree(DATA / name, tmp_path / name)
    expected = np.load(DATA / f"{name}_restored.npz")
    lm = make()
    toks = [int(t) for t in expected["tokens"]]
    with caplog.at_level(logging.WARNING, logger="promptvault.vault.vault"):
        with Vault(tmp_path / name, ram_cap=0) as v:  # no index: rebuilt from the format 1 files
            r = v.restore(lm, toks + [1])
    assert r.tokens_reused == int(expected["reused"]) and r.tier == "disk"
    got = _state(r.cache)
    want = {k: expected[k] for k in expected.files if k not in ("tokens", "reused")}
    assert sorted(got) == sorted(want)
    from promptvault.codec import kernels

    exact = kernels.backend() == "reference"  # the fixtures were restored by the pure-MLX decode
    for k in want:
        if exact or not np.issubdtype(want[k].dtype, np.floating):
            assert np.array_equal(got[k], want[k]), k
        else:  # the fused GPU kernels decode within 1 ulp of the reference
            fi = np.finfo(want[k].dtype)
            assert np.allclose(got[k], want[k], rtol=2 * fi.eps, atol=2 * fi.smallest_subnormal), k
    from promptvault.vault import store
    if "promptvault.caches/1" in store._OLD_FORMAT_NOTED and not caplog.records:
        return  # noted once per process, by an earlier case
    notes = [r.getMessage() for r in caplog.records if "older format" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0]


def _per_layer_payload(cache, start, end):
    """The block as format 1 stored it: every layer encoded on its own."""
    arrays = {}
    metas = [caches._encode_one(c, start, end, DEFAULT_CODEC, f"l{i:02d}", arrays) for i, c in enumerate(cache)]
    mx.eval(list(arrays.values()))
    return caches.BlockPayload(arrays, {"format": caches.FORMAT_V1, "start": start, "end": end,
                                        "codec": DEFAULT_CODEC.to_json(), "layout": caches.layer_layout(cache),
                                        "layers": metas})


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma], ids=["kv", "rings"])
def test_grouped_encode_restores_the_bits_of_per_layer_encodes(make):
    lm = make()
    toks = prompt(56, seed=3)
    cache = make_prompt_cache(lm.model)
    lm.model(mx.array([toks]), cache=cache)
    mx.eval([c.state for c in cache])
    spans = [(0, 16), (16, 32), (32, 48), (48, 56)]
    grouped = [caches.encode_block(cache, a, b, DEFAULT_CODEC) for a, b in spans]
    assert all(p.meta["groups"] for p in grouped)
    per_layer = [_per_layer_payload(cache, a, b) for a, b in spans]
    for n in (56, 40, 16, 9):
        want = _state(caches.restore_cache(lm.model, per_layer, n))
        got = _state(caches.restore_cache(lm.model, grouped, n))
        mixed = _state(caches.restore_cache(lm.model, [per_layer[0], *grouped[1:]], n))  # format 1 then 2
        for k in want:
            assert np.array_equal(got[k], want[k]), (n, k)
            assert np.array_equal(mixed[k], want[k]), (n, k)


def _deep_llama(layers):
    mx.random.seed(0)
    m = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=layers,
                                    intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                    rms_norm_eps=1e-5, vocab_size=128, head_dim=16))
    mx.eval(m.parameters())
    return types.SimpleNamespace(model=m, fingerprint=f"deep-llama-{layers}", tokenizer=None)


def test_chunk_files_hold_a_handful_of_aligned_tensors_whatever_the_depth(tmp_path):
    counts = {}
    for layers in (2, 12):
        with Vault(tmp_path / f"v{layers}", block_size=16) as v:
            v.warm(_deep_llama(layers), prompt(48))
            files = sorted((tmp_path / f"v{layers}" / "shards").rglob("*.safetensors"))
        sizes = []
        for path in files:
            raw = path.read_bytes()
            n = int.from_bytes(raw[:8], "little")
            assert n % 8 == 0
            header = json.loads(raw[8 : 8 + n])
            assert header["__metadata__"]["shard_version"] == "2"
            tensors = sorted((spec["data_offsets"], name) for name, spec in header.items() if name != "__metadata__")
            pos = 0
            for (a, b), name in tensors:
                item = np.dtype(load_file(path)[name].dtype).itemsize
                assert a == pos and a % item == 0, name  # contiguous, each aligned to its element
                pos = b
            assert pos == len(raw) - 8 - n
            sizes.append(len(tensors))
            assert set(load_file(path)) == set(mx.load(str(path)))  # standard safetensors
        counts[layers] = sorted(sizes)
    assert counts[2] == counts[12]  # independent of the number of layers
    assert max(counts[12]) <= 20
