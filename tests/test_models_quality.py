"""The converted real models are the trained models: perplexity, a greedy answer, Gemma's ring.

Perplexity is the sharpest check of a GGUF conversion: a wrong tokenizer or a mis-mapped
tensor still runs, but perplexity rises several-fold. Reference (fp32, first 512 tokens of the
GPL-3 text, measured independently): SmolLM2 ~18.7, Gemma-3-270M ~13.0.
"""

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm import generate
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

TEXT = (Path(__file__).parent / "data" / "gpl3_opening.txt").read_text(encoding="utf-8")


def perplexity(lm, n_tokens=512):
    ids = mx.array(lm.tokenizer.encode(TEXT)[:n_tokens])[None]
    logits = lm.model(ids[:, :-1]).astype(mx.float32)
    return math.exp(nn.losses.cross_entropy(logits[0], ids[0, 1:]).mean().item())


@pytest.mark.parametrize("name, low, high", [("smollm", 15.0, 23.0), ("gemma", 10.0, 16.0)])
def test_perplexity_is_sane(request, name, low, high):
    ppl = perplexity(request.getfixturevalue(name))
    print(f"{name} perplexity (first 512 tokens of tests/data/gpl3_opening.txt, fp32): {ppl:.2f}")
    assert low < ppl < high


def test_smollm_knows_the_capital_of_france(smollm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smollm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    answer = generate(smollm.model, smollm.tokenizer, prompt, max_tokens=16)
    assert "Paris" in answer


def test_gemma_chunked_prefill_through_rings_equals_one_pass(gemma):
    """1,300 tokens: chunks of 300 (past the 512 window), then one single-token step (in-place
    rotation) must give the same final hidden states as one pass, and the same last logits."""
    ids = mx.array(gemma.tokenizer.encode(TEXT * 2)[:1300])[None]
    assert ids.shape[1] == 1300
    body = gemma.model.model  # hidden states before the 262k-wide lm_head keep the test fast

    whole = body(ids, cache=make_prompt_cache(gemma.model))
    cache = make_prompt_cache(gemma.model)
    parts = [body(ids[:, s : min(s + 300, 1299)], cache=cache) for s in range(0, 1299, 300)]
    parts.append(body(ids[:, 1299:], cache=cache))
    chunked = mx.concatenate(parts, axis=1)

    kinds = {type(c) for c in cache}
    assert kinds == {RotatingKVCache, KVCache}
    assert all(c.offset == 1300 for c in cache)
    # Logits within 1e-4 at every 13th position and at each chunk edge (lm_head on all 1,300
    # rows would triple the test's time); hidden states everywhere, relative to their scale,
    # since fp32 sums in differently shaped matmuls differ in the last bits.
    rows = sorted(set(range(0, 1300, 13)) | {299, 300, 599, 600, 899, 900, 1198, 1199, 1298, 1299})
    to_logits = gemma.model.model.embed_tokens.as_linear
    diff_logits = mx.abs(to_logits(chunked[:, rows]) - to_logits(whole[:, rows])).max().item()
    diff_hidden = (mx.abs(chunked - whole).max() / mx.abs(whole).max()).item()
    print(f"gemma ring vs one pass: max |logit diff| {diff_logits:.2e}, relative hidden diff {diff_hidden:.2e}")
    assert diff_logits < 1e-4
    assert diff_hidden < 1e-5
