"""An independent reader of promptvault's version-1 shard files, written from docs/FORMAT.md alone.

It uses numpy, hashlib, xxhash and json only (no MLX, no promptvault), and reads the H_12, H_20
and H_28 matrices out of FORMAT.md itself, so it checks that the page says enough to decode a
vault: every shard's checksum, compact metadata, namespace id and chunk key, then every key and
value segment decoded to float32.

    python docs/format_v1_reader.py VAULT_DIR             # check and decode every shard
    python docs/format_v1_reader.py VAULT_DIR --compare   # also compare with promptvault's decode

Last run (2026-11-30, commit 237e46a, CPU): vaults warmed from examples/data/licenses.txt with
block size 64 on SmolLM2-135M (head dim 64: key parts 16 + 48) and Gemma-3-270M (head dim 256,
ring layers: key parts 64 + 192), default codec: every segment equal to promptvault's decode
within 1e-6 relative; and `promptvault.codec.encode` of random data at head dims 72, 80, 112, 128,
256, 576 with plain, centered 8-bit-norm and outlier-split specs in float16, bfloat16 and float32.
"""

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import xxhash

_DTYPES = {"U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "F16": np.float16, "F32": np.float32}


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def unpack(text: str):
    """Compact JSON: {"$": i} stands for defs[i], recursively."""
    doc = json.loads(text)
    defs = doc["defs"]

    def expand(x):
        if isinstance(x, dict) and set(x) == {"$"}:
            return expand(defs[x["$"]])
        if isinstance(x, dict):
            return {k: expand(v) for k, v in x.items()}
        if isinstance(x, list):
            return [expand(v) for v in x]
        return x

    return expand(doc["value"])


def read_file(path: Path) -> tuple[dict, dict]:
    """(__metadata__, arrays) of a shard whose checksum holds; AssertionError otherwise."""
    buf = path.read_bytes()
    n = int.from_bytes(buf[:8], "little")
    assert n <= len(buf) - 8, "header length past end of file"
    header = buf[8 : 8 + n]
    entries = json.loads(header)
    meta = entries.pop("__metadata__")
    digest = meta["checksum"][len("xxh3_64:") :]
    zeroed = header.replace(f"xxh3_64:{digest}".encode(), b"xxh3_64:" + b"0" * 16, 1)
    assert xxhash.xxh3_64_hexdigest(zeroed + buf[8 + n :]) == digest, "checksum mismatch"
    data = buf[8 + n :]
    arrays = {}
    for name, spec in entries.items():
        start, stop = spec["data_offsets"]
        if spec["dtype"] == "BF16":
            raw = np.frombuffer(data[start:stop], np.uint16).astype(np.uint32) << 16
            arrays[name] = raw.view(np.float32).reshape(spec["shape"])
        else:
            arrays[name] = np.frombuffer(data[start:stop], _DTYPES[spec["dtype"]]).reshape(spec["shape"])
    return meta, arrays


def _supported(n: int) -> bool:
    while n >= 1:
        if n in (1, 12, 20, 28):
            return True
        if n % 2:
            return False
        n //= 2
    return False


def rotation_blocks(n: int) -> list[int]:
    out = []
    while n:
        size = max(m for m in range(1, n + 1) if _supported(m))
        out.append(size)
        n -= size
    return out


def signs(n: int, seed: int) -> np.ndarray:
    stream, counter = b"", 0
    while len(stream) * 8 < n:
        stream += hashlib.sha256(f"promptvault-signs/v1/{seed}/{n}/{counter}".encode()).digest()
        counter += 1
    bits = np.unpackbits(np.frombuffer(stream, np.uint8))[:n]  # most significant bit first
    return np.where(bits == 1, -1.0, 1.0).astype(np.float32)


def _matrices_from_format_md() -> dict[int, np.ndarray]:
    text = (Path(__file__).parent / "FORMAT.md").read_text()
    out = {}
    for m in (12, 20, 28):
        rows = text.split(f"\nH_{m}\n", 1)[1].split("\n\n", 1)[0].split("```", 1)[0].split()
        out[m] = np.array([[1.0 if c == "+" else -1.0 for c in row] for row in rows])
        assert out[m].shape == (m, m), f"H_{m} in FORMAT.md is not {m}x{m}"
    return out


_H = _matrices_from_format_md()


def _sylvester(k: int) -> np.ndarray:
    s = np.array([[1.0]])
    while s.shape[0] < k:
        s = np.block([[s, s], [s, -s]])
    return s


def hadamard(size: int) -> np.ndarray:
    for m in (28, 20, 12):
        k = size // m
        if size % m == 0 and k & (k - 1) == 0:
            return np.kron(_H[m], _sylvester(k))
    return _sylvester(size)


def codebook(s: int, b: int) -> np.ndarray:
    levels = 1 << b
    if s == 1:
        return np.linspace(-1.0, 1.0, levels).astype(np.float32)
    w = min(1.0, 12.0 / np.sqrt(s))
    edges = np.linspace(-w, w, (1 << 17) + 1)
    x = 0.5 * (edges[1:] + edges[:-1])
    log_density = 0.5 * (s - 3) * np.log1p(-x * x)
    mass = np.exp(log_density - log_density.max())
    mass /= mass.sum()
    cum_mass = np.concatenate([[0.0], np.cumsum(mass)])
    cum_moment = np.concatenate([[0.0], np.cumsum(mass * x)])
    c = np.interp((np.arange(levels) + 0.5) / levels, cum_mass[1:], x)
    for _ in range(400):
        cut = np.concatenate([[0], np.searchsorted(x, 0.5 * (c[1:] + c[:-1])), [len(x)]])
        cm = cum_mass[cut[1:]] - cum_mass[cut[:-1]]
        cp = cum_moment[cut[1:]] - cum_moment[cut[:-1]]
        c = np.where(cm > 0, cp / np.where(cm > 0, cm, 1.0), c)
    return (0.5 * (c - c[::-1])).astype(np.float32)


def decode(meta: dict, arrays: dict) -> np.ndarray:
    """One coded tensor (encoded meta + its arrays) as float32 (1, H, T, d)."""
    spec, d = meta["spec"], meta["shape"][-1]
    if spec["codec"] == "lossless/1":
        return arrays["data"].astype(np.float32)
    assert spec["codec"] == "turboquant/1", spec
    codes, norms = arrays["codes"], arrays["norms"]
    n_norms = norms.shape[-1]
    if norms.dtype == np.uint8:
        rng = arrays["norm_range"].astype(np.float32)
        lo, step = rng[..., :n_norms], rng[..., n_norms:]
        norm = np.where(norms > 0, np.exp(lo + (norms.astype(np.float32) - 1) * step), 0).astype(np.float32)
    else:
        norm = norms.astype(np.float32)
    if spec.get("outliers"):
        k = arrays["channels"].shape[-1]
        parts = [(k, spec["outlier_bits"]), (d - k, spec["bits"])]
    else:
        parts = [(d, spec["bits"])]
    decoded, byte0, norm0 = [], 0, 0
    for n, b in parts:
        group = (n + 7) // 8
        code = np.zeros(codes.shape[:-1] + (n,), np.int64)
        for p in range(b):
            plane = codes[..., byte0 + p * group : byte0 + (p + 1) * group]
            bits = np.unpackbits(plane[..., None], axis=-1, bitorder="little")
            code |= bits.reshape(*plane.shape[:-1], group * 8)[..., :n].astype(np.int64) << p
        sg, q, pieces = signs(n, spec["seed"]), 0, []
        for j, s in enumerate(rotation_blocks(n)):
            y = codebook(s, b)[code[..., q : q + s]]
            u = (y @ hadamard(s).T.astype(np.float32)) / np.float32(math.sqrt(s)) * sg[q : q + s]
            pieces.append(u * norm[..., norm0 + j : norm0 + j + 1])
            q += s
        decoded.append(np.concatenate(pieces, -1))
        byte0 += b * group
        norm0 += len(rotation_blocks(n))
    v = np.concatenate(decoded, -1)
    if spec.get("outliers"):
        out = np.empty_like(v)
        for h in range(arrays["channels"].shape[1]):
            hi = arrays["channels"][0, h, 0].astype(np.int64)
            order = np.concatenate([hi, np.setdiff1d(np.arange(d), hi)])
            out[0, h][..., order] = v[0, h]
        v = out
    if spec["center"]:
        v = v + arrays["mean"].astype(np.float32)
    return v


def read_shard(path: Path) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """(chunk, payload, {"lNN.sJ.k": rows, …}) after every check FORMAT.md lists."""
    meta, arrays = read_file(path)
    assert meta["format"] == "promptvault.shard/1", meta["format"]
    chunk, ns, payload = json.loads(meta["chunk"]), unpack(meta["namespace"]), unpack(meta["payload"])
    assert hashlib.blake2b(canonical(ns).encode(), digest_size=16).hexdigest() == chunk["namespace"]
    parent = bytes.fromhex(chunk["parent"]) if chunk["parent"] else bytes(32)
    tokens = arrays["_tokens"].astype("<u4").tobytes()
    key = hashlib.blake2b(parent + bytes.fromhex(chunk["namespace"]) + tokens, digest_size=32).hexdigest()
    assert key == chunk["key"] and path.name == f"{key}.safetensors", "key does not match"
    assert len(arrays["_tokens"]) == chunk["n_tokens"] == payload["end"] - payload["start"]
    rows = {}
    for i, layer in enumerate(payload["layers"]):
        for j, seg in enumerate(layer.get("segments", [])):
            for part in ("k", "v"):
                prefix = f"l{i:02d}.s{j}.{part}."
                sub = {name[len(prefix) :]: a for name, a in arrays.items() if name.startswith(prefix)}
                rows[prefix[:-1]] = decode(seg[part], sub)
    return chunk, payload, rows


def _compare(path: Path, rows: dict) -> float:
    """Worst relative difference from promptvault's own decode of the same shard."""
    import mlx.core as mx
    from promptvault.codec import Encoded, decode as pv_decode
    from promptvault.vault import compact
    from promptvault.vault.shards import read_shard as pv_read

    shard = pv_read(path)
    worst = 0.0
    for i, layer in enumerate(compact.unpack(shard.metadata["payload"])["layers"]):
        for j, seg in enumerate(layer.get("segments", [])):
            for part in ("k", "v"):
                prefix = f"l{i:02d}.s{j}.{part}."
                sub = {n[len(prefix) :]: a for n, a in shard.arrays.items() if n.startswith(prefix)}
                ref = np.array(pv_decode(Encoded.from_parts(seg[part], sub)).astype(mx.float32))
                worst = max(worst, float(np.max(np.abs(ref - rows[prefix[:-1]])) / (np.max(np.abs(ref)) + 1e-30)))
    return worst


def main() -> None:
    root = Path(sys.argv[1])
    compare = "--compare" in sys.argv[2:]
    files = sorted(p for p in (root / "shards").glob("*/*/*.safetensors") if not p.name.startswith(".tmp-"))
    worst = 0.0
    for path in files:
        chunk, payload, rows = read_shard(path)
        if compare:
            worst = max(worst, _compare(path, rows))
    print(f"{len(files)} shards read and decoded" + (f"; worst relative difference {worst:.2e}" if compare else ""))


if __name__ == "__main__":
    main()
