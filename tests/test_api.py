"""The library API an mlx-lm user meets: `import promptvault`, from_mlx_lm, Vault.fetch / save /
warmed / describe, the codec names, the example script, and the one-line missing-backend error."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

import promptvault
from promptvault import DEFAULT_CODEC, CodecSpec, KVCodec, Vault, from_mlx_lm

ROOT = Path(__file__).resolve().parent.parent
LOSSLESS = KVCodec.parse("lossless")
TEXT = (ROOT / "LICENSE").read_text()


def _tokens(lm, n: int, offset: int = 0) -> list[int]:
    return list(lm.tokenizer.encode(TEXT))[offset : offset + n]


def _logits(lm, tokens: list[int], cache=None) -> mx.array:
    cache = make_prompt_cache(lm.model) if cache is None else cache
    return lm.model(mx.array(tokens)[None], cache=cache)[0, -1]


def test_the_public_names():
    for name in promptvault.__all__:
        assert getattr(promptvault, name) is not None, name
    assert DEFAULT_CODEC == KVCodec(keys=CodecSpec(bits=4, center=True, norm_bits=8, outliers=0.25, outlier_bits=6),
                                    values=CodecSpec(bits=3, norm_bits=8), sinks=1)
    with pytest.raises(AttributeError):
        promptvault.NoSuchThing  # noqa: B018


@pytest.mark.parametrize("name", ["lossless", "k4c-v3", "k4cn8o25x6-v3n8-s1", "k8c-v4", "kl-v3n8", "k3-vl-s4",
                                  "k5cr7-v2", "k1-v8o50x8", "k4cn8o12.5x6-v3"])
def test_codec_names_parse_and_print_the_same(name):
    codec = KVCodec.parse(name)
    assert str(codec) == name and KVCodec.parse(str(codec)) == codec
    assert KVCodec.from_json(codec.to_json()) == codec
    for spec in (codec.keys, codec.values):
        assert CodecSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("bad", ["", "k4", "k4c-v3-x1", "k9-v3", "k4q-v3", "kl-vl-s", "K4-V3", "tq4"])
def test_bad_codec_names_are_refused(bad):
    with pytest.raises(ValueError):
        KVCodec.parse(bad)


def test_from_mlx_lm_shares_entries_with_load_model(smollm, tmp_path):
    model, tokenizer = mlx_lm.load(str(smollm.path))  # the converted float32 directory
    wrapped = from_mlx_lm(model, tokenizer, smollm.path)
    assert wrapped.fingerprint == smollm.fingerprint  # the CLI's warm serves a library run, and back
    by_weights = from_mlx_lm(model, tokenizer)
    assert by_weights.fingerprint == from_mlx_lm(model, tokenizer).fingerprint != wrapped.fingerprint
    model.set_dtype(mx.float16)
    assert from_mlx_lm(model, tokenizer).fingerprint != by_weights.fingerprint  # other bytes, other entries
    with pytest.raises(promptvault.ModelLoadError):
        from_mlx_lm(model, tokenizer, tmp_path / "missing")


def test_fetch_then_save_then_fetch(smollm, tmp_path):
    tokens = _tokens(smollm, 300)
    with Vault(tmp_path, block_size=128, codec=LOSSLESS) as vault:
        cache, rest = vault.fetch(smollm, tokens)
        assert rest == tokens and all(type(c) is KVCache and c.offset == 0 for c in cache)
        cold = _logits(smollm, rest, cache)
        s = vault.save(smollm, cache, tokens)
        assert (s.chunks, s.written, s.prefilled) == (3, 3, False) and s.fp16_bytes > 0
        cache, rest = vault.fetch(smollm, tokens)
        assert rest == tokens[-1:]  # everything but the last token, whose logits generation needs
        assert mx.allclose(_logits(smollm, rest, cache), cold, atol=1e-3).item()
        cache, rest = vault.fetch(smollm, tokens[:200] + [42, 43])
        assert rest == [42, 43]


def test_save_of_gemma_rings(gemma, tmp_path):
    """Gemma-3's sliding-window layers (RotatingKVCache, window 512), fed as generation feeds them
    (the prompt, then one token at a time): a prompt within the window is taken from the live
    cache; past it the rings have dropped the first rows, so the prompt is prefilled again.
    Either way a later fetch continues exactly as a cold run."""
    short, long = _tokens(gemma, 300), _tokens(gemma, 900)  # the long one drops block [256, 384)
    with Vault(tmp_path, block_size=128, codec=LOSSLESS) as vault:
        for tokens, prefilled in ((short, False), (long, True)):
            cache = make_prompt_cache(gemma.model)
            assert any(type(c) is RotatingKVCache for c in cache)
            _logits(gemma, tokens[:-1], cache)
            _logits(gemma, tokens[-1:], cache)  # a one-token update: a full ring drops its oldest row
            s = vault.save(gemma, cache, tokens)
            assert s.prefilled is prefilled and s.written > 0
            question = tokens + _tokens(gemma, 5, offset=1000)
            cache, rest = vault.fetch(gemma, question)
            assert rest == question[len(tokens):]
            assert mx.allclose(_logits(gemma, rest, cache), _logits(gemma, question), atol=1e-3).item()


def test_warmed_and_describe(smollm, tmp_path):
    tokens = _tokens(smollm, 300)
    with Vault(tmp_path, block_size=128, codec=LOSSLESS) as vault:
        vault.warm(smollm, tokens, label="license", source="LICENSE")
        [w] = vault.warmed()
        assert (w.label, w.source, w.tokens) == ("license", "LICENSE", 300)
        d = vault.describe("license")
        assert d.warmed == [w] and d.chunk is None
        [chain] = d.chains
        assert [c.position for c in chain] == [0, 128, 256] and chain[-1].key == w.last_key
        one = vault.describe(chain[1].key[:10])
        assert one.chunk.key == chain[1].key and [c.key for c in one.chains[0]] == [c.key for c in chain[:2]]
        with pytest.raises(promptvault.VaultSettingsError, match="matches 0 chunks"):
            vault.describe("nothing-like-this")
        stats = vault.stats()
        assert stats.chunks == 3 and stats.namespaces[0].codec == "lossless" and stats.warmed == 1


def test_the_example_runs(smollm, tmp_path):
    """examples/library.py (the README's library example): the second run reuses the first's cache."""
    env = {**os.environ, "PROMPTVAULT_MODELS": os.environ["PROMPTVAULT_MODELS"]}
    runs = [subprocess.run([sys.executable, str(ROOT / "examples" / "library.py"), str(smollm.path), str(tmp_path)],
                           capture_output=True, text=True, env=env, timeout=600) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    first, second = (r.stdout.splitlines()[0].split() for r in runs)
    assert first[1] == "0" and int(second[1]) == int(second[3]) - 1  # "reused N of M prompt tokens"
    assert runs[1].stdout.splitlines()[1].strip()


def test_missing_mlx_backend_is_one_line(tmp_path):
    """MLX's Linux wheel without [cpu]/[cuda] fails to load libmlx.so: the executable and the
    library say what to install instead of a traceback."""
    fake = tmp_path / "mlx"
    fake.mkdir()
    (fake / "__init__.py").write_text(textwrap.dedent("""
        raise ImportError("libmlx.so: cannot open shared object file: No such file or directory")
    """))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    exe = Path(sys.executable).parent / "promptvault"
    cli = subprocess.run([str(exe), "stats"], capture_output=True, text=True, env=env, timeout=120)
    assert cli.returncode == 1 and cli.stdout == ""
    assert cli.stderr.strip().splitlines() == [cli.stderr.strip()] and 'pip install "promptvault[cpu]"' in cli.stderr
    lib = subprocess.run([sys.executable, "-c", "import promptvault\ntry:\n    promptvault.Vault\n"
                          "except ImportError as e:\n    print(type(e).__name__, e)"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert lib.stdout.startswith("MissingBackendError") and 'pip install "promptvault[cpu]"' in lib.stdout


def test_cli_codec_and_option_sets(tmp_path):
    """The CLI names codecs in the one grammar, and verbs that run no model take no model options."""
    from click.testing import CliRunner

    from promptvault.cli import main

    def cli(*args):
        return CliRunner().invoke(main, [str(a) for a in args])

    bad = cli("warm", tmp_path / "doc.txt", "--codec", "k4z-v3", "--vault", tmp_path / "v")
    assert bad.exit_code == 2 and "is not a codec" in bad.output
    both = cli("run", "-p", "hi", "--codec", "k4c-v3", "--quality", "small", "--vault", tmp_path / "v")
    assert both.exit_code == 2 and "--quality, --codec" in both.output
    for verb in ("verify", "stats", "ls", "reindex", "gc"):
        for option in ("--block-size", "--model", "--key-bits"):
            assert cli(verb, option, "8", "--vault", tmp_path / "v").exit_code == 2, (verb, option)
    assert cli("config", "--disk-cap", "none", "--vault", tmp_path / "v").exit_code == 0
    assert cli("gc", "--max-bytes", "lots", "--vault", tmp_path / "v").exit_code == 2
