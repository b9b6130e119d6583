"""Every CLI verb through click's CliRunner (and the installed executable), on the real
default model (SmolLM2-135M) and real vault directories; every error is one line."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from promptvault.cli import main

DOC = Path(__file__).parents[1] / "examples" / "data" / "licenses.txt"
QUESTION = "\n\nQuestion: Which license is this? Answer:"


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> Path:
    """~480 tokens of real text (the start of the Apache-2.0 license)."""
    path = tmp_path_factory.mktemp("doc") / "doc.txt"
    path.write_text(DOC.read_text()[:2400])
    return path


@pytest.fixture(scope="module")
def question(doc) -> Path:
    path = doc.with_name("question.txt")
    path.write_text(doc.read_text() + QUESTION)
    return path


def cli(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def ok_json(*args):
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_one_line_error(result, code, *fragments):
    assert result.exit_code == code, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def warmed(smollm, doc, question, tmp_path_factory):
    """A vault (block size 128) with `doc` warmed, then one run of doc + question."""
    vault = tmp_path_factory.mktemp("vault")
    warm = ok_json("warm", doc, "--vault", vault, "--block-size", 128, "--label", "apache")
    first = ok_json("run", "--prompt-file", question, "--vault", vault, "--max-tokens", 4)
    second = ok_json("run", "--prompt-file", question, "--vault", vault, "--max-tokens", 4)
    return vault, warm, first, second


def test_warm_reports_each_prompt(warmed):
    _, warm, _, _ = warmed
    [row] = warm["prompts"]
    assert row["tokens"] > 400 and row["new_chunks"] == -(-row["tokens"] // 128) and row["reused_chunks"] == 0
    assert row["bytes_written"] > 0 and row["seconds"] > 0
    assert set(row) >= {"source", "tokens", "new_chunks", "reused_chunks", "bytes_written", "seconds"}


def test_run_reuses_the_warmed_document_then_everything_but_the_last_token(warmed):
    _, warm, first, second = warmed
    doc_tokens = warm["prompts"][0]["tokens"]
    assert first["reused_tokens"] >= doc_tokens - 2 and first["tier"] in ("disk", "ram")
    assert first["prompt_tokens"] > doc_tokens
    assert second["prompt_tokens"] == first["prompt_tokens"]
    assert second["reused_tokens"] == second["prompt_tokens"] - 1
    for key in ("text", "prompt_tokens", "reused_tokens", "restore_s", "prefill_s", "ttft_s", "generation_tps"):
        assert key in second


def test_lossless_vault_run_matches_cold_run(smollm, question, tmp_path):
    vault = tmp_path / "v"
    args = ["--prompt-file", question, "--max-tokens", 8, "--vault", vault, "--block-size", 64,
            "--key-bits", "lossless", "--value-bits", "lossless"]
    cold = ok_json("run", *args, "--no-vault")
    ok_json("run", *args)  # stores the prompt
    warm = ok_json("run", *args)
    assert cold["reused_tokens"] == 0 and cold["tier"] == "none"
    assert warm["reused_tokens"] == warm["prompt_tokens"] - 1
    assert warm["text"] == cold["text"]


def test_run_no_save_stores_nothing(smollm, tmp_path):
    vault = tmp_path / "v"
    out = ok_json("run", "--prompt", "The capital of France is", "--max-tokens", 2, "--no-save", "--vault", vault)
    assert out["saved_chunks"] == 0
    assert ok_json("stats", "--vault", vault)["chunks"] == 0


def test_ls_stats_inspect_verify(warmed):
    vault = warmed[0]
    [entry] = [e for e in ok_json("ls", "--vault", vault) if e["label"] == "apache"]
    assert entry["tokens"] == warmed[1]["prompts"][0]["tokens"]
    stats = ok_json("stats", "--vault", vault)
    assert stats["chunks"] >= 5 and stats["bytes_on_disk"] > stats["shard_bytes"] > 0
    assert stats["fp16_bytes"] > 3.5 * stats["shard_bytes"]
    assert len(stats["namespaces"]) == 1
    info = ok_json("inspect", "apache", "--vault", vault)
    assert info["entries"][0]["chain"][0]["position"] == 0
    key = info["entries"][0]["chain"][1]["key"]
    assert ok_json("inspect", key[:16], "--vault", vault)["chunk"]["key"] == key
    assert ok_json("verify", "--vault", vault) == {"checked": stats["chunks"], "corrupt": 0, "quarantined": 0,
                                                    "adopted": 0, "missing": 0, "bad_keys": []}


def test_verify_quarantines_a_flipped_byte_and_exits_nonzero(smollm, doc, tmp_path):
    vault = tmp_path / "v"
    ok_json("warm", doc, "--vault", vault, "--block-size", 256)
    shard = sorted((vault / "shards").rglob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = cli("verify", "--vault", vault, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["corrupt"] == 1 and report["quarantined"] == 1
    assert cli("verify", "--vault", vault).exit_code == 0


def test_gc_rm_reindex(smollm, doc, tmp_path):
    vault = tmp_path / "v"
    ok_json("warm", doc, "--vault", vault, "--block-size", 128, "--label", "doc")
    chunks = ok_json("stats", "--vault", vault)["chunks"]
    (vault / "index.sqlite").unlink()
    for suffix in ("-wal", "-shm"):
        Path(f"{vault / 'index.sqlite'}{suffix}").unlink(missing_ok=True)
    rebuilt = ok_json("reindex", "--vault", vault)
    assert rebuilt["indexed"] == chunks
    assert cli("gc", "--vault", vault, "--max-bytes", "1").exit_code == 1  # below one block: refused
    gc = ok_json("gc", "--vault", vault, "--max-bytes", "800K", "--evict-all")
    assert gc["evicted"] == chunks
    ok_json("warm", doc, "--vault", vault, "--block-size", 128, "--label", "doc")
    assert ok_json("rm", "doc", "--vault", vault)["removed_chunks"] == chunks
    assert ok_json("stats", "--vault", vault)["chunks"] == 0


def test_doctor_and_bench_codec():
    report = ok_json("doctor")
    assert report["mlx"] and report["matmul_fp32_gflops"] > 0
    rows = ok_json("bench", "codec", "--no-real", "--dims", "64", "--bits", "3", "--tokens", "64")
    methods = {r["method"] for r in rows}
    assert {"turboquant", "affine-g64"} <= methods
    for row in rows:
        assert {"method", "bits", "dim", "bytes_per_vector", "ratio_vs_fp16", "rel_mse", "cosine",
                "encode_gbps", "decode_gbps"} <= set(row)


def test_installed_executable_runs_and_reports_json(smollm, tmp_path):
    exe = shutil.which("promptvault", path=str(Path(sys.executable).parent))
    assert exe, "the promptvault console script is not installed"
    vault = tmp_path / "v"
    env = {**os.environ, "PROMPTVAULT_HOME": str(vault)}
    # Lossless, so the restored run must produce exactly the cold run's text (with lossy coding
    # this prompt's top two first tokens are close enough to swap).
    args = [exe, "run", "--prompt", "What is the capital of France?", "--max-tokens", "12", "--json",
            "--key-bits", "lossless", "--value-bits", "lossless"]
    first = json.loads(subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout)
    second = json.loads(subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout)
    assert "Paris" in first["text"]
    assert second["reused_tokens"] == second["prompt_tokens"] - 1 and second["text"] == first["text"]
    bad = subprocess.run([exe, "warm", str(tmp_path / "missing.txt")], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "no such file" in bad.stderr


# --- errors: one line on stderr, non-zero exit ---------------------------------------------


def test_missing_source(tmp_path):
    assert_one_line_error(cli("warm", tmp_path / "nope.txt", "--vault", tmp_path / "v"), 1, "no such file")


def test_unreadable_source(tmp_path):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    assert_one_line_error(cli("warm", binary, "--vault", tmp_path / "v"), 1, "not UTF-8")


def test_empty_prompts(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert_one_line_error(cli("warm", empty, "--vault", tmp_path / "v"), 1, "empty prompt")
    assert_one_line_error(cli("run", "--prompt", "", "--vault", tmp_path / "v"), 1, "empty prompt")
    assert_one_line_error(cli("run", "--vault", tmp_path / "v", input=""), 1, "empty prompt")


def test_malformed_json_and_jsonl_name_the_line(tmp_path):
    bad_json = tmp_path / "p.json"
    bad_json.write_text('[\n  "ok",\n  "missing quote\n]')
    assert_one_line_error(cli("warm", bad_json, "--vault", tmp_path / "v"), 1, "p.json", "line 3")
    bad_jsonl = tmp_path / "p.jsonl"
    bad_jsonl.write_text('{"prompt": "fine"}\n{"prompt": \n')
    assert_one_line_error(cli("warm", bad_jsonl, "--vault", tmp_path / "v"), 1, "p.jsonl:2")
    wrong_shape = tmp_path / "q.jsonl"
    wrong_shape.write_text('{"text": "no prompt key"}\n')
    assert_one_line_error(cli("warm", wrong_shape, "--vault", tmp_path / "v"), 1, "q.jsonl:1")


def test_unknown_model(tmp_path):
    assert_one_line_error(cli("run", "--prompt", "hi", "--model", tmp_path / "no-such-model", "--vault", tmp_path / "v"), 1)


def test_vault_path_not_writable(smollm, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_one_line_error(cli("run", "--prompt", "hi", "--max-tokens", 1, "--vault", blocker / "vault"), 1, "vault")


@pytest.mark.parametrize("flag,value", [("--key-bits", "9"), ("--value-bits", "0"), ("--key-bits", "three")])
def test_invalid_bits(flag, value, tmp_path):
    assert_one_line_error(cli("run", "--prompt", "hi", flag, value, "--vault", tmp_path / "v"), 2, flag)


def test_cap_too_small_for_one_block(smollm, doc, tmp_path):
    assert_one_line_error(cli("warm", doc, "--vault", tmp_path / "v", "--disk-cap", "1K"), 1, "cap")


def test_verbose_logs_what_the_vault_does(warmed, question):
    vault = warmed[0]
    quiet = CliRunner().invoke(main, ["run", "--prompt-file", str(question), "--vault", str(vault),
                                      "--max-tokens", "1", "--json"])
    loud = CliRunner().invoke(main, ["-v", "run", "--prompt-file", str(question), "--vault", str(vault),
                                     "--max-tokens", "1", "--json"])
    assert quiet.exit_code == loud.exit_code == 0
    assert "restored" not in quiet.stderr
    assert "promptvault: restored" in loud.stderr and "tokens from" in loud.stderr
