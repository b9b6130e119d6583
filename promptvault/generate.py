"""Generate from a prompt, reusing the longest stored prefix of it: the library side of `run`.

With a vault, the longest stored prefix is restored into fresh mlx-lm caches and generation
starts from it: only the tokens after that prefix (at least the last one) go through the model
before the first new token. The prompt's new blocks are stored after the answer, off the path to
the first token: straight from the live cache when every layer is a plain KVCache (its rows for
the prompt are still there), otherwise by `Vault.warm`, which recomputes them (a ring has dropped
old rows, recurrent state has moved on). Without a vault the run is an ordinary cold mlx-lm
generation, for comparison.

A conversation (`promptvault chat`) stores more than the prompt: `store_tokens` maps the answer's
text to the tokens the next turn will start with (the history rendered with this answer), and
the cache rows that match them are stored, so the next turn prefills only its new message.
"""

import logging
import time
from dataclasses import asdict, dataclass
from typing import Callable

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from promptvault.errors import PromptvaultError
from promptvault.vault.caches import UnsupportedCacheError, position
from promptvault.tokens import common_prefix

log = logging.getLogger(__name__)
# Prompt tokens per prefill step: small enough that a progress line moves every second or two
# on a CPU, large enough to keep the matmuls efficient.
PREFILL_STEP = 512


@dataclass
class RunResult:
    text: str
    prompt_tokens: int
    reused_tokens: int
    tier: str  # "ram", "disk", or "none" (nothing reused / no vault)
    saved_chunks: int  # blocks this run wrote to the vault
    save_s: float  # storing new blocks, after the answer (0 when nothing new or --no-save)
    restore_s: float
    prefill_s: float  # remaining prompt tokens through the model, up to the first new token
    ttft_s: float  # start of the run (before any vault work) to the first new token
    generation_tokens: int
    generation_tps: float
    finish_reason: str | None

    def to_json(self) -> dict:
        return asdict(self)


def run_prompt(
    lm,
    tokens: list[int],
    *,
    vault=None,
    save: bool = True,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
    on_prefill: Callable[[int, int], None] | None = None,
    store_tokens: Callable[[str], list[int]] | None = None,
) -> RunResult:
    """Generate up to max_tokens after `tokens`; `on_text` receives text as it streams,
    `on_prefill(done, total)` the prompt tokens processed (restored ones count as done) after
    each prefill step. `store_tokens(answer_text)` gives the tokens to store after the answer
    instead of the prompt (see the module docstring)."""
    if not tokens:
        raise PromptvaultError("empty prompt: nothing to run")
    if max_tokens < 1:
        raise PromptvaultError(f"--max-tokens must be at least 1, got {max_tokens}")
    if seed is not None:
        mx.random.seed(seed)
    start = time.perf_counter()
    if vault is not None:
        restored = vault.restore(lm, tokens)
        cache, reused, tier, restore_s = restored.cache, restored.tokens_reused, restored.tier, restored.seconds
    else:
        cache, reused, tier, restore_s = make_prompt_cache(lm.model), 0, "none", 0.0
    prefill_start = time.perf_counter()
    pieces, answer, ttft_s, prefill_s, last = [], [], 0.0, 0.0, None
    progress = None if on_prefill is None else (lambda done, total: on_prefill(reused + done, reused + total))
    for response in stream_generate(
        lm.model, lm.tokenizer, mx.array(tokens[reused:]), max_tokens=max_tokens,
        sampler=make_sampler(temp=temp, top_p=top_p), prompt_cache=cache,
        prefill_step_size=PREFILL_STEP, prompt_progress_callback=progress,
    ):
        if last is None:
            now = time.perf_counter()
            ttft_s, prefill_s = now - start, now - prefill_start
        last = response
        answer.append(int(response.token))
        pieces.append(response.text)
        if on_text is not None and response.text:
            on_text(response.text)
    saved, save_s = 0, 0.0
    if vault is not None and save and vault.read_only:
        log.warning("the vault at %s is read-only: this prompt's new blocks were not stored", vault.root)
    elif vault is not None and save:
        save_start = time.perf_counter()
        wanted = None if store_tokens is None else list(store_tokens("".join(pieces)))
        keep = _tokens_to_store(tokens, answer, cache, wanted)
        try:
            saved = vault.save(lm, cache, keep).written
        except UnsupportedCacheError as e:  # the answer stands; only storing it is impossible
            log.warning("%s: this prompt was not stored", e)
        save_s = time.perf_counter() - save_start
    return RunResult(
        text="".join(pieces), prompt_tokens=len(tokens), reused_tokens=reused, tier=tier,
        saved_chunks=saved, save_s=save_s, restore_s=restore_s, prefill_s=prefill_s, ttft_s=ttft_s,
        generation_tokens=last.generation_tokens, generation_tps=last.generation_tps,
        finish_reason=last.finish_reason,
    )


def _tokens_to_store(prompt: list[int], answer: list[int], cache: list, wanted: list[int] | None) -> list[int]:
    """The prompt, or the longest prefix of `wanted` that the live cache has seen (the prompt
    then the answer tokens fed back), never less than the prompt."""
    if wanted is None:
        return prompt
    seen = position(cache)
    n = common_prefix((prompt + answer)[:seen], wanted)
    return wanted[:n] if n > len(prompt) else prompt
