"""Fidelity benchmark: how much does a coded prompt cache change what the model says?

Protocol (per model, per prompt of the fixed set in `promptvault/bench/prompts/`):
  - tokens x_0 … x_{P+64}: the prompt's first P tokens are the prefix, the next 65 its true
    continuation. The prefix is prefilled once losslessly (cached on disk, so reruns are cheap).
  - for every setting the prefix cache is cut into vault blocks, each block coded with the
    setting's codec (`caches.encode_block`, the vault's own path) and restored
    (`caches.restore_cache`); the same is done with the lossless codec for the reference.
  - teacher-forced: x_P … x_{P+63} run in one forward pass on the restored cache; the 64 next-
    token distributions are compared with the reference's: KL(p_ref ‖ p) in nats, top-1
    agreement, and perplexity of the true continuation x_{P+1} … x_{P+64}.
  - greedy (selected settings): x_P, then 64 greedy tokens; identical to the lossless run or
    not, and the length of the common prefix.
  - per-layer cosine of the restored keys and values with the lossless ones.
  - bytes on disk: the exact shard bytes (safetensors header with the vault's metadata, codes,
    norms, means, ranges, lossless sink rows) of the first prompt's blocks, over the float16
    size of the same keys and values.
MLX affine rows quantize the restored keys and values with `mx.quantize` (group 64) and count
b + 0.5 bits per coordinate (float16 scales and biases), as mlx-lm's QuantizedKVCache holds them.
"""

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from promptvault.codec import LOSSLESS, KVCodec
from promptvault.tokens import common_prefix, encode_text

PROMPTS_FILE = Path(__file__).parent / "prompts" / "prompts.json"
CONTINUATION = 64


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    """One way of storing the prefix: a KVCodec with a block size, or MLX affine (bits)."""

    name: str
    kv: KVCodec | None = None
    block_size: int = 256
    affine_bits: int | None = None

    @property
    def lossless(self) -> bool:
        return self.kv is not None and self.kv.keys.lossless and self.kv.values.lossless and not self.kv.sinks


def parse_setting(name: str) -> Setting:
    """Names: 'affine4', 'affine8', or a codec name (promptvault.codec.spec grammar, e.g.
    'lossless', 'k4c-v3', 'k4cn8o25x6-v3n8-s1') with an optional block size '-b<tokens>'
    (e.g. 'k5cn8-v3n8-s4-b512')."""
    if name.startswith("affine"):
        return Setting(name, affine_bits=int(name[len("affine"):]))
    codec, block = name, 256
    m = re.match(r"^(.*)-b(\d+)$", name)
    if m:
        codec, block = m.group(1), int(m.group(2))
    return Setting(name, KVCodec.parse(codec), block_size=block)


# Issue 6's grid (centered keys, as the vault codes them), 8-bit keys, MLX affine; then what
# issue 9 tried for keys: more bits, 8-bit log norms, lossless attention sinks, block sizes.
GRID = [f"k{k}c-v{v}" for k in (2, 3, 4) for v in (2, 3, 4)] + ["k8c-v4", "k8c-v3"]
SWEEP = ["k4-v4", "k4c-v4-s4", "k4cn8-v3n8-s4", "k5c-v3", "k5cn8-v3n8", "k5cn8-v3n8-s4", "k5cn8-v2n8-s4",
         "k6cn8-v3n8-s4", "k6cn8-v2n8-s4", "k5cn8-v3n8-s4-b128", "k5cn8-v3n8-s4-b512"]
DEFAULT_SETTINGS = ["lossless", "affine4", "affine8"] + GRID + SWEEP


# ---------------------------------------------------------------- prompts


def load_prompts(path: Path = PROMPTS_FILE) -> list[dict]:
    return json.loads(Path(path).read_text())["prompts"]


def prompt_tokens(prompt: dict, tokenizer) -> list[int]:
    """Token ids of a prompt: text as is; chat through the model's chat template, or a plain
    'Role: text' layout when the tokenizer has none (Gemma-3-270M base)."""
    from promptvault.prompting import encode_messages, has_chat_template

    if "text" in prompt:
        return encode_text(tokenizer, prompt["text"])
    messages = prompt["messages"]
    if has_chat_template(tokenizer):
        return encode_messages(tokenizer, messages, add_generation_prompt=False)
    return encode_text(tokenizer, "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages))


# ---------------------------------------------------------------- one prompt


@dataclass
class Prepared:
    """A prompt's lossless prefill: the prefix cache and its token ids."""

    prompt_id: str
    kind: str
    tokens: list[int]  # P + 65
    prefix: int
    cache: list = field(repr=False)


def _cache_path(cache_dir: Path, fingerprint: str, prompt_id: str, tokens: list[int]) -> Path:
    h = hashlib.blake2b(np.asarray(tokens, np.uint32).tobytes(), digest_size=8).hexdigest()
    return cache_dir / fingerprint[:16] / f"{prompt_id}-{len(tokens)}-{h}.safetensors"


def prepare(lm, prompt: dict, prefix: int, cache_dir: Path | None) -> Prepared:
    from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

    ids = prompt_tokens(prompt, lm.tokenizer)
    need = prefix + CONTINUATION + 1
    if len(ids) < need:
        raise ValueError(f"prompt {prompt['id']} has {len(ids)} tokens, fewer than {need}")
    ids = ids[:need]
    path = _cache_path(cache_dir, lm.fingerprint, prompt["id"], ids) if cache_dir else None
    if path is not None and path.exists():
        cache = load_prompt_cache(str(path))
    else:
        cache = make_prompt_cache(lm.model)
        lm.model(mx.array(ids[:prefix])[None], cache=cache)
        mx.eval([c.state for c in cache])
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_prompt_cache(str(path), cache)
    return Prepared(prompt["id"], prompt.get("kind", "?"), ids, prefix, cache)


def encode_payloads(prep: Prepared, kv: KVCodec, block_size: int) -> list:
    from promptvault.vault.caches import encode_block

    return [encode_block(prep.cache, s, min(s + block_size, prep.prefix), kv) for s in range(0, prep.prefix, block_size)]


def _valid_rows(c) -> int:
    return min(int(c.offset), c.keys.shape[2])


def _affine(cache: list, bits: int) -> None:
    for c in cache:
        n = _valid_rows(c)
        for name in ("keys", "values"):
            buf = getattr(c, name)
            rows = buf[..., :n, :]
            q = mx.quantize(rows, group_size=64, bits=bits)
            buf[..., :n, :] = mx.dequantize(*q, group_size=64, bits=bits).astype(rows.dtype)
        mx.eval(c.keys, c.values)


def restored_cache(lm, prep: Prepared, setting: Setting) -> list:
    from promptvault.vault.caches import restore_cache

    kv = KVCodec(LOSSLESS, LOSSLESS) if setting.affine_bits else setting.kv
    cache = restore_cache(lm.model, encode_payloads(prep, kv, setting.block_size), prep.prefix)
    if setting.affine_bits:
        _affine(cache, setting.affine_bits)
    return cache


def layer_cosines(cache: list, ref: list) -> tuple[list[float], list[float]]:
    """Per layer: mean cosine of restored key (value) vectors with the lossless ones."""
    out_k, out_v = [], []
    for c, r in zip(cache, ref):
        n = _valid_rows(r)
        for name, out in (("keys", out_k), ("values", out_v)):
            a, b = getattr(c, name)[..., :n, :], getattr(r, name)[..., :n, :]
            num = mx.sum(a * b, axis=-1)
            den = mx.sqrt(mx.sum(a * a, axis=-1) * mx.sum(b * b, axis=-1))
            out.append(mx.mean(num / mx.maximum(den, 1e-30)))
    mx.eval(out_k, out_v)
    return [x.item() for x in out_k], [x.item() for x in out_v]


def teacher_forced(lm, cache: list, prep: Prepared) -> mx.array:
    """Log-probabilities (64, vocab) of the next token after each of x_P … x_{P+63}."""
    inputs = mx.array(prep.tokens[prep.prefix : prep.prefix + CONTINUATION])[None]
    logits = lm.model(inputs, cache=cache)[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def greedy(lm, cache: list, prep: Prepared, steps: int = CONTINUATION) -> list[int]:
    token = mx.array([[prep.tokens[prep.prefix]]])
    out = []
    for _ in range(steps):
        logits = lm.model(token, cache=cache)
        nxt = mx.argmax(logits[0, -1]).item()
        out.append(nxt)
        token = mx.array([[nxt]])
    return out


def compare(logp: mx.array, ref: mx.array, targets: list[int]) -> dict:
    p_ref = mx.exp(ref)
    kl = mx.sum(p_ref * (ref - logp), axis=-1)
    top1 = mx.argmax(logp, axis=-1) == mx.argmax(ref, axis=-1)
    nll = -mx.take_along_axis(logp, mx.array(targets)[:, None], axis=-1)
    return {"kl": mx.mean(kl).item(), "top1": mx.mean(top1.astype(mx.float32)).item(),
            "nll": mx.mean(nll).item()}


# ---------------------------------------------------------------- bytes on disk


def fp16_bytes(cache: list, prefix: int) -> int:
    """Bytes of every stored key and value row in float16 (all `prefix` rows of every layer, as
    the vault stores each block right after it is processed)."""
    total = 0
    for c in cache:
        b, h, _, d = c.keys.shape
        dv = c.values.shape[-1]
        total += b * h * prefix * (d + dv) * 2
    return total


def shard_bytes(lm, prep: Prepared, setting: Setting) -> int:
    """Exact bytes of the shards the vault would write for this prefix (header and metadata
    included), or for affine the packed codes plus float16 scales and biases."""
    if setting.affine_bits:
        per_coord = setting.affine_bits / 8 + 4 / 64
        return int(round(fp16_bytes(prep.cache, prep.prefix) / 2 * per_coord))
    import tempfile

    from promptvault.vault import Vault
    from promptvault.vault.records import encode_chunk

    tokens = prep.tokens[: prep.prefix]
    with tempfile.TemporaryDirectory() as tmp, Vault(tmp, block_size=setting.block_size, codec=setting.kv) as vault:
        ns = vault.namespace(lm)
        return sum(encode_chunk(ns, p, tokens, "0" * 64, "0" * 64 if p.start else None).nbytes
                   for p in encode_payloads(prep, setting.kv, setting.block_size))


# ---------------------------------------------------------------- the run


def run_fidelity(lm, settings: list[str], *, prompts: list[dict] | None = None, limit: int | None = None,
                 prefix: int = 1024, greedy_settings: list[str] | None = None, cache_dir: Path | None = None,
                 log=None, checkpoint=None) -> dict:
    """Rows per setting (means over prompts) and per-prompt results; see the module docstring."""
    prompts = load_prompts() if prompts is None else prompts
    prompts = prompts[:limit] if limit else prompts
    parsed = [parse_setting(s) for s in settings]
    greedy_set = set(settings if greedy_settings is None else greedy_settings)
    per_prompt = {s.name: [] for s in parsed}
    sizes = {}
    t_start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        prep = prepare(lm, prompt, prefix, cache_dir)
        base = Setting("lossless", KVCodec(LOSSLESS, LOSSLESS))
        ref_cache = restored_cache(lm, prep, base)
        ref_logp = teacher_forced(lm, ref_cache, prep)
        ref_greedy = greedy(lm, restored_cache(lm, prep, base), prep) if greedy_set else None
        ref_cache = restored_cache(lm, prep, base)
        targets = prep.tokens[prep.prefix + 1 : prep.prefix + 1 + CONTINUATION]
        for s in parsed:
            if s.name not in sizes:
                sizes[s.name] = (shard_bytes(lm, prep, s), fp16_bytes(prep.cache, prep.prefix))
            cache = restored_cache(lm, prep, s)
            cos_k, cos_v = layer_cosines(cache, ref_cache)
            row = compare(teacher_forced(lm, cache, prep), ref_logp, targets)
            row.update(prompt=prep.prompt_id, kind=prep.kind, cos_k=cos_k, cos_v=cos_v)
            if s.name in greedy_set:
                g = greedy(lm, restored_cache(lm, prep, s), prep)
                row.update(greedy_same=g == ref_greedy, greedy_prefix=common_prefix(g, ref_greedy))
            per_prompt[s.name].append(row)
        if log:
            log(f"prompt {i + 1}/{len(prompts)} {prep.prompt_id}: {time.perf_counter() - t_start:.0f}s")
        if checkpoint:
            checkpoint(_result(lm, parsed, per_prompt, sizes, prefix, i + 1))
    return _result(lm, parsed, per_prompt, sizes, prefix, len(prompts))


def _result(lm, parsed, per_prompt, sizes, prefix, n) -> dict:
    rows = [summarize(s, per_prompt[s.name], sizes[s.name]) for s in parsed]
    return {"model": getattr(lm, "name", None), "prefix": prefix, "continuation": CONTINUATION,
            "prompts": n, "rows": rows, "per_prompt": per_prompt}


def summarize(s: Setting, results: list[dict], size: tuple[int, int]) -> dict:
    nbytes, fp16 = size
    row = {"setting": s.name, "codec": str(s.kv) if s.kv else f"MLX affine {s.affine_bits}-bit g64",
           "block_size": s.block_size if s.kv else None, "bytes": nbytes, "ratio_vs_fp16": fp16 / nbytes,
           "kl": float(np.mean([r["kl"] for r in results])), "kl_max": float(np.max([r["kl"] for r in results])),
           "top1": float(np.mean([r["top1"] for r in results])),
           "ppl": math.exp(float(np.mean([r["nll"] for r in results]))),
           "cos_k": [float(x) for x in np.mean([r["cos_k"] for r in results], axis=0)],
           "cos_v": [float(x) for x in np.mean([r["cos_v"] for r in results], axis=0)]}
    if "greedy_same" in results[0]:
        row["greedy_same"] = float(np.mean([r["greedy_same"] for r in results]))
        row["greedy_prefix"] = float(np.mean([r["greedy_prefix"] for r in results]))
    return row


def format_table(result: dict) -> str:
    from promptvault.tables import format_table as table

    rows = []
    for r in result["rows"]:
        rows.append({
            "setting": r["setting"], "codec": r["codec"], "vs fp16": f"{r['ratio_vs_fp16']:.2f}x",
            "KL": f"{r['kl']:.4f}", "top-1": f"{100 * r['top1']:.1f}%", "ppl": f"{r['ppl']:.3f}",
            "greedy =": f"{100 * r['greedy_same']:.0f}%" if "greedy_same" in r else "",
            "common": f"{r['greedy_prefix']:.1f}" if "greedy_prefix" in r else "",
            "cos K min/mean": f"{min(r['cos_k']):.4f}/{np.mean(r['cos_k']):.4f}",
            "cos V mean": f"{np.mean(r['cos_v']):.4f}",
        })
    return table(rows)


def pareto(rows: list[dict]) -> list[str]:
    """Settings no other setting beats on both ratio (higher) and KL (lower)."""
    out = []
    for r in rows:
        if not any(o["ratio_vs_fp16"] >= r["ratio_vs_fp16"] and o["kl"] < r["kl"] and o is not r for o in rows):
            out.append(r["setting"])
    return out


def plot(results: list[dict], path: Path) -> None:
    """Bytes-on-disk ratio vs KL, one panel per model; affine and lossless marked apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 5), squeeze=False)
    for ax, res in zip(axes[0], results):
        front = set(pareto([r for r in res["rows"] if r["kl"] > 0]))
        for r in res["rows"]:
            if r["kl"] <= 0:
                continue
            affine = r["setting"].startswith("affine")
            ax.scatter(r["ratio_vs_fp16"], r["kl"], marker="s" if affine else "o",
                       color="tab:red" if affine else ("tab:blue" if r["setting"] in front else "tab:gray"), s=28)
            ax.annotate(r["setting"], (r["ratio_vs_fp16"], r["kl"]), fontsize=6.5, xytext=(3, 2),
                        textcoords="offset points")
        pts = sorted((r["ratio_vs_fp16"], r["kl"]) for r in res["rows"] if r["setting"] in front)
        if pts:
            ax.plot(*zip(*pts), color="tab:blue", lw=0.8)
        ax.set_yscale("log")
        ax.axhline(0.005, color="k", ls=":", lw=0.8)
        ax.axvline(3.8, color="k", ls=":", lw=0.8)
        ax.set_xlabel("bytes on disk: ratio vs float16 (higher is smaller)")
        ax.set_ylabel("mean teacher-forced KL vs lossless (nats)")
        ax.set_title(f"{res['model']}: {res['prompts']} prompts × {res['prefix']} tokens")
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def vault_check(lm, prompt: dict, setting: str, prefix: int, cache_dir: Path | None = None) -> dict:
    """The same setting through a real Vault (warm block by block, write shards, restore from
    disk) next to this harness's direct encode/restore: shard bytes on disk vs the harness's
    count, and KL / top-1 of the vault-restored continuation vs the harness-restored one (they
    differ only by the rounding of block-by-block vs one-shot prefill)."""
    import tempfile

    from promptvault.vault import Vault

    s = parse_setting(setting)
    prep = prepare(lm, prompt, prefix, cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        with Vault(tmp, block_size=s.block_size, codec=s.kv, ram_cap=0) as vault:
            stored = vault.warm(lm, prep.tokens[:prefix])
        with Vault(tmp, block_size=s.block_size, codec=s.kv, ram_cap=0) as vault:
            r = vault.restore(lm, prep.tokens[: prefix + 1])
            if r.tokens_reused != prefix or r.tier != "disk":
                raise RuntimeError(f"vault restored {r.tokens_reused} tokens from {r.tier}, expected {prefix} from disk")
            targets = prep.tokens[prefix + 1 : prefix + 1 + CONTINUATION]
            from_vault = teacher_forced(lm, r.cache, prep)
    direct = teacher_forced(lm, restored_cache(lm, prep, s), prep)
    ref = teacher_forced(lm, restored_cache(lm, prep, Setting("lossless", KVCodec(LOSSLESS, LOSSLESS))), prep)
    return {"setting": setting, "prompt": prompt["id"], "vault_bytes": stored.bytes_written,
            "harness_bytes": shard_bytes(lm, prep, s), "fp16_bytes": fp16_bytes(prep.cache, prefix),
            "vault_vs_harness": compare(from_vault, direct, targets),
            "vault_vs_lossless": compare(from_vault, ref, targets),
            "harness_vs_lossless": compare(direct, ref, targets)}


def markdown_table(result: dict) -> str:
    """The rows as a Markdown table (README / docs)."""
    head = ("| setting | codec | vs fp16 | KL (nats) | top-1 | ppl | greedy = | common prefix | min cos K | "
            "mean cos V |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in result["rows"]:
        lines.append(
            f"| `{r['setting']}` | {r['codec']}" + (f", block {r['block_size']}" if r.get("block_size") not in (None, 256) else "")
            + f" | {r['ratio_vs_fp16']:.2f}x | {r['kl']:.4f} | {100 * r['top1']:.1f}% | {r['ppl']:.3f} | "
            + (f"{100 * r['greedy_same']:.0f}% | {r['greedy_prefix']:.1f}" if "greedy_same" in r else " | ")
            + f" | {min(r['cos_k']):.4f} | {np.mean(r['cos_v']):.4f} |")
    return "\n".join(lines)
