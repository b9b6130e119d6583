"""`bench fidelity` on the real SmolLM2, CI-sized: one prompt of the shipped set, a short prefix."""

import json

import pytest
from click.testing import CliRunner

from promptvault.bench.fidelity import (
    DEFAULT_SETTINGS,
    load_prompts,
    parse_setting,
    prompt_tokens,
    run_fidelity,
    vault_check,
)
from promptvault.cli import main

PREFIX = 64


def test_prompt_set_is_varied_and_long_enough(smollm):
    prompts = load_prompts()
    assert len(prompts) >= 20
    assert {p["kind"] for p in prompts} == {"prose", "code", "chat"}
    assert len({p["id"] for p in prompts}) == len(prompts)
    for p in prompts:
        assert p["license"] and p["source"]
        assert len(prompt_tokens(p, smollm.tokenizer)) >= 2048 + 65, p["id"]


def test_setting_names_parse():
    s = parse_setting("k5cn8-v3n8-s4-b512")
    assert (s.kv.keys.bits, s.kv.keys.center, s.kv.keys.norm_bits) == (5, True, 8)
    assert (s.kv.values.bits, s.kv.values.center, s.kv.values.norm_bits) == (3, False, 8)
    assert (s.kv.sinks, s.block_size) == (4, 512)
    assert parse_setting("affine8").affine_bits == 8 and parse_setting("lossless").lossless
    for name in DEFAULT_SETTINGS:
        parse_setting(name)
    with pytest.raises(ValueError):
        parse_setting("k4c")
    with pytest.raises(ValueError):
        parse_setting("k4-v3-x1")


def test_fidelity_rows_on_a_real_model(smollm, tmp_path):
    res = run_fidelity(smollm, ["lossless", "k2c-v2", "affine4"], limit=1, prefix=PREFIX,
                       greedy_settings=["lossless", "k2c-v2"], cache_dir=tmp_path)
    rows = {r["setting"]: r for r in res["rows"]}
    lossless, k2, affine = rows["lossless"], rows["k2c-v2"], rows["affine4"]
    # Lossless restores the exact cache: identical distributions and continuation.
    assert lossless["kl"] == 0.0 and lossless["top1"] == 1.0
    assert lossless["greedy_same"] == 1.0 and lossless["greedy_prefix"] == 64
    assert min(lossless["cos_k"]) > 0.99999 and len(lossless["cos_k"]) == 30
    # 2-bit coding changes the distribution measurably but not wildly, and is far smaller.
    assert 1e-4 < k2["kl"] < 1.0 and k2["top1"] > 0.5
    assert 0.9 < min(k2["cos_k"]) < 0.9999 and 0.85 < min(k2["cos_v"]) < 0.99
    assert k2["ratio_vs_fp16"] > 5.0 and lossless["ratio_vs_fp16"] < 0.5  # float32 cache on CPU
    assert affine["ratio_vs_fp16"] == pytest.approx(16 / 4.5, rel=1e-3) and affine["kl"] > 0
    assert "greedy_same" not in affine
    # The prefill was cached on disk for the next run.
    assert list(tmp_path.rglob("*.safetensors"))


def test_vault_path_matches_the_harness(smollm, tmp_path):
    check = vault_check(smollm, load_prompts()[0], "k4cn8-v3n8-s4-b32", PREFIX, cache_dir=tmp_path)
    # Real shards on disk hold what the harness counts (metadata strings differ by a few bytes).
    assert check["vault_bytes"] == pytest.approx(check["harness_bytes"], rel=0.01)
    assert check["fp16_bytes"] / check["vault_bytes"] > 2.0
    # Restoring from the vault gives the harness's distributions up to prefill rounding.
    assert check["vault_vs_harness"]["kl"] < 1e-3
    assert check["vault_vs_lossless"]["kl"] == pytest.approx(check["harness_vs_lossless"]["kl"], rel=0.2, abs=1e-4)


def test_cli_json_and_plot(smollm, tmp_path):
    png = tmp_path / "front.png"
    result = CliRunner().invoke(main, ["bench", "fidelity", "--settings", "lossless,k3c-v3", "--greedy", "none",
                                       "--prompts", "1", "--prefix-tokens", str(PREFIX), "--cache-dir",
                                       str(tmp_path / "c"), "--plot", str(png), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [r["setting"] for r in data[0]["rows"]] == ["lossless", "k3c-v3"]
    assert data[0]["rows"][1]["kl"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = CliRunner().invoke(main, ["bench", "fidelity", "--settings", "k9z"])
    assert bad.exit_code != 0 and "--settings" in bad.output


def test_plot_without_matplotlib_fails_before_the_run(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = CliRunner().invoke(main, ["bench", "fidelity", "--model", str(tmp_path / "no-such-model"),
                                       "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 2
    assert "promptvault[bench]" in result.output and "no-such-model" not in result.output
