"""Shard files: safetensors interop, checksums that catch any flipped byte, atomic 0600 writes."""

import os
import stat

import mlx.core as mx
import pytest

from promptvault.vault.shards import CorruptShard, read_metadata, read_shard, relpath, write_shard


def _arrays():
    mx.random.seed(1)
    return {
        "l00.k.codes": mx.random.randint(0, 255, (1, 2, 5, 6)).astype(mx.uint8),
        "l00.k.norms": mx.random.normal((1, 2, 5, 1)).astype(mx.float16),
        "l00.v.mean": mx.random.normal((1, 2, 1, 8)).astype(mx.bfloat16),
        "l01.a0": mx.random.normal((1, 3)),
        "_tokens": mx.array([5, 2**32 - 1, 0], dtype=mx.uint32),
    }


def test_roundtrip_and_interop(tmp_path):
    arrays = _arrays()
    path = tmp_path / relpath("ab" * 32)
    written = write_shard(path, arrays, {"format": "x", "chunk": '{"key":"k"}'})
    nbytes, checksum = written.nbytes, written.checksum
    assert written.published and nbytes == path.stat().st_size
    shard = read_shard(path)
    assert shard.checksum == checksum and shard.metadata == {"format": "x", "chunk": '{"key":"k"}'}
    for name, a in arrays.items():
        assert shard.arrays[name].dtype == a.dtype and mx.array_equal(shard.arrays[name], a).item()
    # standard readers see the same tensors and metadata
    loaded, meta = mx.load(str(path), return_metadata=True)
    assert set(loaded) == set(arrays) and meta["format"] == "x"
    assert mx.array_equal(loaded["l00.v.mean"], arrays["l00.v.mean"]).item()
    meta, digest, tokens = read_metadata(path, "_tokens")
    assert digest == checksum and tokens.tolist() == [5, 2**32 - 1, 0]


def test_every_flipped_byte_is_detected(tmp_path):
    path = tmp_path / "s.safetensors"
    write_shard(path, _arrays(), {"chunk": "meta"})
    good = path.read_bytes()
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= 0x10
        path.write_bytes(bytes(bad))
        with pytest.raises(CorruptShard):
            read_shard(path)
    path.write_bytes(good[:-1])  # truncated
    with pytest.raises(CorruptShard):
        read_shard(path)


def test_permissions_fanout_and_no_temp_files(tmp_path):
    key = "0f" + "e1" + "9" * 60
    path = tmp_path / "shards" / relpath(key)
    (tmp_path / "shards").mkdir(mode=0o700)
    write_shard(path, _arrays(), {})
    write_shard(path, _arrays(), {})  # writing the same chunk again leaves one file and no temp
    assert path.relative_to(tmp_path / "shards").parts == ("0f", "e1", key + ".safetensors")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for d in (path.parent, path.parent.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert os.listdir(path.parent) == [path.name]


def test_empty_arrays_rejected(tmp_path):
    with pytest.raises(ValueError, match="size-0"):
        write_shard(tmp_path / "e.safetensors", {"x": mx.zeros((0, 3))}, {})
    assert not list(tmp_path.iterdir())


def test_first_complete_file_wins(tmp_path):
    """Two writers of one key with different bytes (a lossy codec over slightly different prefix
    states): the second keeps the first's file and learns its checksum, never replaces it."""
    path = tmp_path / relpath("cd" * 32)
    first = write_shard(path, _arrays(), {"writer": "one"})
    before = path.read_bytes()
    other = {**_arrays(), "l01.a0": mx.ones((1, 3))}
    second = write_shard(path, other, {"writer": "two"})
    assert first.published and not second.published
    assert path.read_bytes() == before and second.checksum == first.checksum == read_shard(path).checksum
    assert second.nbytes == len(before) and read_shard(path).metadata == {"writer": "one"}
    assert os.listdir(path.parent) == [path.name]


def test_a_damaged_winner_is_reported_not_replaced(tmp_path):
    path = tmp_path / relpath("ef" * 32)
    write_shard(path, _arrays(), {})
    path.write_bytes(b"\xff" * 16)  # header length past the end
    with pytest.raises(CorruptShard):
        write_shard(path, _arrays(), {})
    assert path.read_bytes() == b"\xff" * 16 and os.listdir(path.parent) == [path.name]
