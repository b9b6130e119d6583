"""`promptvault bench speed`: what the vault buys for one model, per prefix length.

Per prefix of P tokens (random token ids: speed does not depend on the text):
  - cold prefill of P tokens through mlx-lm (2,048-token steps, as mlx-lm's generate does);
  - warm = Vault.warm: prefill in steps (2,048 tokens on a GPU, as cold; 512 on CPU, where smaller
    steps are faster), each step's blocks encoded, their files
    written by a background thread during the next step; its overhead over cold, and its split
    (warm_prefill_s, warm_encode_s; warm_write_s is the writer's file time plus index time, which
    overlaps the prefill);
  - restore of the P-token prefix from the RAM tier and from disk (a fresh Vault with the RAM tier
    off; the shards' page cache is dropped with posix_fadvise(DONTNEED) first, where the OS
    allows), split into read / decode+assembly;
  - the read limit: a plain sequential read of the same shard files (one thread, one reused
    buffer), with the page cache dropped and from the page cache, measured in the same run just
    before the disk restores; ratios restore / read limit for both;
  - where the disk restore's time goes (`--profile`): lookup, file reads, checksums, MLX arrays
    (the upload, on a GPU), decode + assembly; files and tensors read;
  - mlx-lm's own `save_prompt_cache` / `load_prompt_cache` of the same cache (page cache dropped
    the same way): bytes and times;
  - bytes on disk (vault shards) vs the raw fp16 K/V and vs mlx-lm's file; ratios
    restore / mlx-lm load and cold / restore.
Each figure is one measurement except the RAM restore (median of 3).

`--model random:llama3-8b` / `random:qwen3-8b` builds a randomly initialised model of that shape
in bfloat16 in-process (no download; for GPU runs).
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from promptvault.models.load import LoadedModel

STEP = 2048  # mlx-lm's default prefill step, and Vault.warm's on a GPU (write_path.PREFILL_STEP)

RANDOM_SHAPES = {
    # Llama-3.1-8B: 32 layers, 32 query / 8 KV heads of 128, MLP 14,336, vocab 128,256.
    "llama3-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                      vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False),
    # Qwen3-8B: 36 layers, 32 / 8 heads of 128, MLP 12,288, vocab 151,936, QK-norm.
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, num_hidden_layers=36, intermediate_size=12288,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                     vocab_size=151936, rope_theta=1000000.0, tie_word_embeddings=False,
                     max_position_embeddings=40960),
}


def random_model(shape: str, dtype=mx.bfloat16, seed: int = 0, layers: int | None = None) -> LoadedModel:
    """A randomly initialised mlx-lm model of a known shape (`layers` overrides the depth)."""
    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown random model shape {shape!r} (known: {', '.join(RANDOM_SHAPES)})")
    args = dict(RANDOM_SHAPES[shape])
    if layers is not None:
        args["num_hidden_layers"] = layers
    mx.random.seed(seed)
    if args["model_type"] == "llama":
        from mlx_lm.models.llama import Model, ModelArgs
    else:
        from mlx_lm.models.qwen3 import Model, ModelArgs
    model = Model(ModelArgs(**args))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    name = f"random:{shape}" + (f"-{layers}l" if layers is not None else "")
    # The weights follow from (shape, dtype, seed): that names them, with no hash of them to compute.
    return LoadedModel(model, None, None, f"{name}/{dtype}/seed{seed}", name)


def load_lm(spec: str):
    if spec.startswith("random:"):
        rest = spec.split(":", 1)[1]
        shape, _, layers = rest.partition("@")
        return random_model(shape, layers=int(layers) if layers else None)
    from promptvault.models import load_model

    return load_model(spec)


def _vocab(lm) -> int:
    args = getattr(lm.model, "args", None)
    return int(getattr(args, "vocab_size", 32000))


def _sync():
    mx.synchronize()


def drop_page_cache(paths) -> bool:
    """Ask the kernel to drop the page cache of these files (clean pages only). True if it could."""
    if not hasattr(os, "posix_fadvise"):
        return False
    ok = True
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            ok = False
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            ok = False
        finally:
            os.close(fd)
    return ok


def _files(root: Path) -> list[Path]:
    return [p for p in Path(root).rglob("*") if p.is_file()]


def read_limit(paths: list[Path]) -> float:
    """Seconds to read every file in `paths` once, in order, with plain `readinto` calls into one
    reused buffer: what the bytes alone cost, for comparison with a restore of the same files."""
    size = max((p.stat().st_size for p in paths), default=0)
    buf = memoryview(bytearray(size))
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def cold_prefill(model, tokens: np.ndarray):
    """Fresh cache with `tokens` prefilled in STEP-token steps; (cache, seconds)."""
    from mlx_lm.models.cache import make_prompt_cache

    from promptvault.vault.caches import evaluate_cache as _eval_cache

    _sync()
    t0 = time.perf_counter()
    cache = make_prompt_cache(model)
    for s in range(0, len(tokens), STEP):
        model(mx.array(tokens[s : s + STEP], dtype=mx.uint32)[None], cache=cache)
        _eval_cache(cache)
    _sync()
    return cache, time.perf_counter() - t0


def _kv_fp16_bytes(cache, n: int) -> int:
    """Bytes of the K/V rows of n tokens in float16 (what an uncompressed fp16 cache holds)."""
    total = 0
    for c in cache:
        keys = getattr(c, "keys", None)
        if keys is None:
            continue
        rows = min(n, keys.shape[-2]) if type(c).__name__ == "RotatingKVCache" else n
        heads = int(np.prod(keys.shape[:-2]))
        total += 2 * heads * rows * (keys.shape[-1] + c.values.shape[-1])
    return total


def bench_prefix(lm, n: int, workdir: Path, *, seed: int = 0, block_size: int | None = None) -> dict:
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    from promptvault.vault import Vault
    from promptvault.vault.caches import evaluate_cache as _eval_cache

    rng = np.random.default_rng(seed + n)
    tokens = rng.integers(0, _vocab(lm), size=n + 1, dtype=np.int64)
    row = {"tokens": n}

    # warm-up of this length's kernels (not timed): a short prefill, and on a GPU a whole first
    # cold prefill (its 2,048-token steps compile kernels the short one does not)
    cold_prefill(lm.model, tokens[: min(n, 64)])
    if mx.default_device() == mx.gpu:
        cold_prefill(lm.model, tokens[:n])

    cache, row["cold_prefill_s"] = cold_prefill(lm.model, tokens[:n])
    row["fp16_bytes"] = _kv_fp16_bytes(cache, n)

    # mlx-lm's own file of the same cache
    mlx_file = workdir / f"mlxlm-{n}.safetensors"
    _sync()
    t0 = time.perf_counter()
    save_prompt_cache(str(mlx_file), cache)
    row["mlxlm_save_s"] = time.perf_counter() - t0
    row["mlxlm_bytes"] = mlx_file.stat().st_size
    del cache
    dropped = drop_page_cache([mlx_file])
    t0 = time.perf_counter()
    loaded = load_prompt_cache(str(mlx_file))
    _eval_cache(loaded)
    _sync()
    row["mlxlm_load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = load_prompt_cache(str(mlx_file))
    _eval_cache(loaded)
    _sync()
    row["mlxlm_load_cached_s"] = time.perf_counter() - t0
    del loaded
    mlx_file.unlink()

    vdir = workdir / f"vault-{n}"
    kwargs = {} if block_size is None else {"block_size": block_size}
    with Vault(vdir, ram_cap=2**40, **kwargs) as vault:
        _sync()
        t0 = time.perf_counter()
        res = vault.warm(lm, tokens[:n])
        _sync()
        row["warm_s"] = time.perf_counter() - t0
        row["warm_prefill_s"], row["warm_encode_s"], row["warm_write_s"] = res.prefill_s, res.encode_s, res.write_s
        row["vault_bytes"] = res.bytes_written
        times = []
        for _ in range(3):
            r = vault.restore(lm, tokens)
            _sync()
            if r.tokens_reused != n or r.tier != "ram":
                raise RuntimeError(f"RAM restore gave {r.tokens_reused} tokens from {r.tier!r}, expected {n} from 'ram'")
            times.append((r.seconds, r.read_s, r.decode_s))
            del r
        times.sort()
        row["restore_ram_s"], _, row["restore_ram_decode_s"] = times[1]
    shard_files = sorted((vdir / "shards").rglob("*.safetensors"))  # the chunk files only (not the ledger)
    row["shard_bytes_on_disk"] = sum(p.stat().st_size for p in shard_files)
    row["shard_files"] = len(shard_files)
    dropped = drop_page_cache(shard_files) and dropped
    row["read_limit_s"] = read_limit(shard_files)
    row["read_limit_cached_s"] = read_limit(shard_files)
    with Vault(vdir, ram_cap=0) as vault:
        dropped = drop_page_cache(_files(vdir)) and dropped
        _sync()
        r = vault.restore(lm, tokens)
        _sync()
        if r.tokens_reused != n or r.tier != "disk":
            raise RuntimeError(f"disk restore gave {r.tokens_reused} tokens from {r.tier!r}, expected {n} from 'disk'")
        row["restore_disk_s"], row["restore_disk_read_s"], row["restore_disk_decode_s"] = r.seconds, r.read_s, r.decode_s
        row["restore_disk_lookup_s"] = r.lookup_s
        for key in ("file_read_s", "checksum_s", "arrays_s", "files", "tensors", "bytes_read"):
            row[f"restore_disk_{key}"] = getattr(r, key)
        del r
        r = vault.restore(lm, tokens)
        _sync()
        row["restore_disk_cached_s"] = r.seconds
        del r
    shutil.rmtree(vdir, ignore_errors=True)
    row["page_cache_dropped"] = dropped
    row["warm_overhead"] = row["warm_s"] / row["cold_prefill_s"] - 1
    row["vs_fp16"] = row["fp16_bytes"] / row["shard_bytes_on_disk"]
    row["vs_mlxlm_file"] = row["mlxlm_bytes"] / row["shard_bytes_on_disk"]
    row["restore_disk_over_mlxlm_load"] = row["restore_disk_s"] / row["mlxlm_load_s"]
    row["cold_over_restore_disk"] = row["cold_prefill_s"] / row["restore_disk_s"]
    row["cold_over_restore_ram"] = row["cold_prefill_s"] / row["restore_ram_s"]
    row["restore_disk_over_read_limit"] = row["restore_disk_s"] / row["read_limit_s"]
    row["restore_cached_over_read_limit"] = row["restore_disk_cached_s"] / row["read_limit_cached_s"]
    return row


def environment() -> dict:
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    from promptvault.codec import kernels

    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
            "processor": platform.processor() or platform.platform(), "cpus": os.cpu_count(),
            "device": str(mx.default_device()), "mlx": mx.__version__, "mlx_lm": version("mlx-lm"),
            "fused_kernels": kernels.backend()}


def run_speed_bench(model: str, lengths: list[int], *, seed: int = 0, workdir: str | None = None,
                    block_size: int | None = None) -> dict:
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)  # a new --workdir is made, like a new vault
    lm = load_lm(model)
    tmp = Path(tempfile.mkdtemp(prefix="pv-speed-", dir=workdir))
    try:
        t0 = time.perf_counter()
        _warm_up(lm, tmp)
        warm_up_s = time.perf_counter() - t0
        rows = [bench_prefix(lm, n, tmp, seed=seed, block_size=block_size) for n in lengths]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"model": getattr(lm, "name", model), "env": environment(), "warm_up_s": warm_up_s, "rows": rows}


def _warm_up(lm, workdir: Path) -> None:
    """One small warm + restore, not timed: compiles the kernels (MLX's and the fused codec's,
    a few seconds each on first use in a process) so that no row pays for it."""
    from promptvault.vault import Vault

    tokens = np.arange(1, 300) % _vocab(lm)
    with Vault(workdir / "warm-up") as vault:
        vault.warm(lm, tokens)
        vault.restore(lm, tokens)
    shutil.rmtree(workdir / "warm-up", ignore_errors=True)


COLUMNS = [
    ("tokens", "tokens"), ("cold_prefill_s", "cold s"), ("warm_s", "warm s"), ("warm_overhead", "warm +%"),
    ("restore_ram_s", "RAM restore s"), ("restore_disk_s", "disk restore s"), ("restore_disk_read_s", "  read"),
    ("restore_disk_decode_s", "  decode"), ("read_limit_s", "read limit s"),
    ("restore_disk_over_read_limit", "restore/read limit"), ("restore_disk_cached_s", "cached restore s"),
    ("read_limit_cached_s", "cached read limit s"), ("restore_cached_over_read_limit", "cached restore/read limit"),
    ("mlxlm_load_s", "mlx-lm load s"), ("mlxlm_save_s", "mlx-lm save s"),
    ("shard_bytes_on_disk", "vault MB"), ("mlxlm_bytes", "mlx-lm MB"), ("vs_fp16", "x vs fp16"),
    ("vs_mlxlm_file", "x vs mlx-lm"), ("restore_disk_over_mlxlm_load", "restore/load"),
    ("cold_over_restore_disk", "cold/restore"), ("cold_over_restore_ram", "cold/RAM restore"),
]

# --profile: where the disk restore (page cache dropped) went. File reads and checksums run on
# several threads, so they are sums over files and may add up to more than the read wall time.
PROFILE = [
    ("tokens", "tokens"), ("restore_disk_s", "disk restore s"), ("restore_disk_lookup_s", "lookup"),
    ("restore_disk_read_s", "read (wall)"), ("restore_disk_file_read_s", "  file reads (sum)"),
    ("restore_disk_checksum_s", "  checksums (sum)"), ("restore_disk_arrays_s", "  arrays/upload"),
    ("restore_disk_decode_s", "decode + assembly"), ("restore_disk_files", "files"),
    ("restore_disk_tensors", "tensors"), ("read_limit_s", "read limit s"),
]


def _fmt(key, v):
    if v is None:
        return "-"
    if "bytes" in key:
        return f"{v / 1e6:,.1f}"
    if key == "warm_overhead":
        return f"{100 * v:+.0f}%"
    if key == "tokens":
        return f"{v:,}"
    if key in ("restore_disk_files", "restore_disk_tensors"):
        return f"{v:,}"
    if key.endswith("_s"):
        return f"{v * 1e3:,.1f} ms" if v < 1 else f"{v:,.2f} s"
    return f"{v:.2f}"


def _table(result: dict, columns: list) -> list[str]:
    lines = ["| " + " | ".join(h.strip() for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in result["rows"]:
        lines.append("| " + " | ".join(_fmt(k, row.get(k)) for k, _ in columns) + " |")
    return lines


def format_table(result: dict, profile: bool = False) -> str:
    env = result["env"]
    head = (f"model {result['model']} | {env['device']} | {env['processor']} ({env['cpus']} cpus) | "
            f"mlx {env['mlx']}, mlx-lm {env['mlx_lm']} | fused kernels: {env['fused_kernels']} | {env['date']}")
    lines = [head, *_table(result, COLUMNS)]
    if profile:
        lines += ["", "where the disk restore's time went (file reads and checksums: sums over the reading threads)",
                  *_table(result, PROFILE)]
    dropped = all(r["page_cache_dropped"] for r in result["rows"])
    lines.append("page cache before disk reads: " + ("dropped (posix_fadvise DONTNEED)" if dropped else
                                                      "NOT dropped (the OS refused): disk figures may be cached"))
    return "\n".join(lines)
