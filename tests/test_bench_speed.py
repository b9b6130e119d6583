"""`promptvault bench speed` at CI size: one real model, one short prefix, table and JSON."""

import json

from click.testing import CliRunner

from promptvault.bench.speed import format_table, run_speed_bench
from promptvault.cli import main


def test_speed_bench_rows_are_measured_and_consistent(tmp_path):
    result = run_speed_bench("smollm2", [96], workdir=str(tmp_path))
    (row,) = result["rows"]
    assert row["tokens"] == 96
    for key in ("cold_prefill_s", "warm_s", "restore_ram_s", "restore_disk_s", "mlxlm_load_s", "mlxlm_save_s"):
        assert row[key] > 0, key
    # the parts of a disk restore add up to at most its total
    assert row["restore_disk_read_s"] + row["restore_disk_decode_s"] <= row["restore_disk_s"] + 1e-6
    # SmolLM2 (30 layers, 3 KV heads of 64) in float32: 96 tokens of fp16 K/V
    assert row["fp16_bytes"] == 30 * 3 * 96 * (64 + 64) * 2
    assert row["mlxlm_bytes"] > row["fp16_bytes"]  # mlx-lm stores the fp32 cache (and 256-row padding)
    # default codec K4 centered / V3: well under fp16 even with per-shard headers at this size
    assert 2.0 < row["vs_fp16"] < 5.5
    assert row["vs_mlxlm_file"] == row["mlxlm_bytes"] / row["shard_bytes_on_disk"]
    assert abs(row["warm_overhead"] - (row["warm_s"] / row["cold_prefill_s"] - 1)) < 1e-9
    assert result["env"]["fused_kernels"] == "reference"  # CPU
    # the read limit: the same files read plainly, cold and cached, and the ratios against it
    assert row["read_limit_s"] > 0 and row["read_limit_cached_s"] > 0
    assert row["restore_disk_over_read_limit"] == row["restore_disk_s"] / row["read_limit_s"]
    # the profile: every shard file read once, a handful of tensors each (layer groups: not 30 layers' worth)
    assert row["restore_disk_files"] == row["shard_files"] and row["restore_disk_bytes_read"] == row["shard_bytes_on_disk"]
    assert 0 < row["restore_disk_tensors"] <= 20 * row["restore_disk_files"]
    table = format_table(result, profile=True)
    assert "| 96 |" in table and "page cache" in table and "read limit" in table and "checksums" in table


def test_speed_cli_json(tmp_path):
    out = CliRunner().invoke(main, ["bench", "speed", "--model", "smollm2", "--lengths", "40", "--json",
                                    "--profile", "--workdir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert [r["tokens"] for r in data["rows"]] == [40]
    assert list(tmp_path.iterdir()) == []  # temporary vault and mlx-lm file removed


def test_speed_cli_rejects_bad_lengths():
    out = CliRunner().invoke(main, ["bench", "speed", "--lengths", "12,x"])
    assert out.exit_code != 0 and "comma-separated" in out.output
