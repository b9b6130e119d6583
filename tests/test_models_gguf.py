"""GGUF loader: round trips per architecture, content-keyed conversion cache, broken files."""

import shutil

import mlx.core as mx
import pytest
from test_models_helpers import random_model, write_gguf

from promptvault.errors import ModelLoadError, PromptvaultError, UnsupportedModelError
from promptvault.models import load_model
from promptvault.models import load as load_module
from promptvault.models.cache_dir import models_cache_dir


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory):
    model, config = random_model("llama")
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_gguf(path, "llama", model, config)
    return path, model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_round_trip_gives_same_logits(tmp_path, arch):
    model, config = random_model(arch, seed=1)
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(path, arch, model, config)
    loaded = load_model(str(path), dtype="float32")

    assert type(loaded.model) is type(model)
    tokens = mx.random.randint(0, config["vocab_size"], (1, 40), key=mx.random.key(3))  # 40 > Gemma's window of 8
    diff = mx.abs(loaded.model(tokens) - model(tokens)).max().item()
    assert diff < 1e-4, f"{arch}: max |logit diff| {diff}"


@pytest.mark.parametrize("arch, piece", [("llama", "Ġthe"), ("qwen2", "Ġthe"), ("gemma3", "▁the")])
def test_round_trip_tokenizer_uses_merges(tmp_path, arch, piece):
    model, config = random_model(arch)
    path = tmp_path / f"tok-{arch}.gguf"
    write_gguf(path, arch, model, config)
    tok = load_model(str(path)).tokenizer
    text = "in the\n\nthe  hint, then" if arch == "gemma3" else "in the 2026 theme,\n\n\ttoken"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(piece) in ids


def test_second_load_does_not_convert_again(llama_gguf, monkeypatch, tmp_path):
    path, _ = llama_gguf
    first = load_model(str(path))
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(path, copy)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(load_module, "convert_gguf", no_conversion)
    again = load_model(str(path))
    renamed = load_model(str(copy))  # keyed by content, not by name
    assert again.path == renamed.path == first.path
    assert again.fingerprint == renamed.fingerprint == first.fingerprint


def test_changed_content_and_dtype_make_new_entries(llama_gguf, tmp_path):
    path, _ = llama_gguf
    base = load_model(str(path), dtype="float32")
    edited = tmp_path / "edited.gguf"
    data = bytearray(path.read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"  # last float of the last tensor -> 1.0
    edited.write_bytes(bytes(data))
    other = load_model(str(edited), dtype="float32")
    half = load_model(str(path), dtype="float16")
    assert len({base.path, other.path, half.path}) == 3
    assert len({base.fingerprint, other.fingerprint, half.fingerprint}) == 3
    assert half.model.model.embed_tokens.weight.dtype == mx.float16


def test_new_converter_version_replaces_old_conversion(tmp_path):
    model, config = random_model("qwen2", seed=5)
    path = tmp_path / "versions.gguf"
    write_gguf(path, "qwen2", model, config)
    current = load_model(str(path), dtype="float32").path
    older = current.with_name(current.name.rsplit("-c", 1)[0] + "-c0")
    shutil.copytree(current, older)
    shutil.rmtree(current)
    assert load_model(str(path), dtype="float32").path == current
    assert current.is_dir() and not older.exists()


def _one_line_error(spec, kind=ModelLoadError):
    with pytest.raises(kind) as info:
        load_model(spec)
    message = str(info.value)
    assert isinstance(info.value, PromptvaultError)
    assert message and "\n" not in message
    return message


def test_missing_path(tmp_path):
    assert "no such model file or directory" in _one_line_error(str(tmp_path / "absent.gguf"))
    assert "no such model file or directory" in _one_line_error("./absent-dir")


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "mlx-lm cannot load" in _one_line_error(str(tmp_path / "empty"))


def test_non_gguf_file(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("just some text, not a model\n")
    assert "not a GGUF file" in _one_line_error(str(path))


@pytest.mark.parametrize("keep", [0.5, 0.999, 40])
def test_truncated_file(llama_gguf, tmp_path, keep):
    path, _ = llama_gguf
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:keep])
    message = _one_line_error(str(cut))
    assert "truncated" in message or "corrupt" in message


def test_unknown_architecture_leaves_no_partial_model(tmp_path):
    model, config = random_model("llama")
    path = tmp_path / "mamba.gguf"
    write_gguf(path, "llama", model, config, architecture_name="mamba")
    before = set((models_cache_dir() / "mlx").glob("*"))
    message = _one_line_error(str(path), UnsupportedModelError)
    assert "'mamba'" in message and "llama" in message
    assert set((models_cache_dir() / "mlx").glob("*")) == before


def test_missing_metadata_is_named(tmp_path):
    model, config = random_model("qwen2")
    path = tmp_path / "no-width.gguf"
    write_gguf(path, "qwen2", model, config, skip={"add_embedding_length"})
    assert "qwen2.embedding_length is missing" in _one_line_error(str(path), UnsupportedModelError)


def test_gemma_per_layer_window_pattern(tmp_path):
    """Newer GGUFs list "is sliding" per layer; a periodic list loads, another is refused."""
    model, config = random_model("gemma3", seed=2)
    periodic = tmp_path / "periodic.gguf"
    write_gguf(periodic, "gemma3", model, config, extra=lambda w: w.add_sliding_window_pattern([True] * 5 + [False]))
    loaded = load_model(str(periodic))
    tokens = mx.arange(30)[None]
    assert mx.abs(loaded.model(tokens) - model(tokens)).max().item() < 1e-4
    odd = tmp_path / "odd.gguf"
    write_gguf(odd, "gemma3", model, config, extra=lambda w: w.add_sliding_window_pattern([True, False] * 3))
    ok = load_model(str(odd))  # period 2 is still expressible
    assert ok.model.args.sliding_window_pattern == 2
    bad = tmp_path / "bad.gguf"
    write_gguf(bad, "gemma3", model, config, extra=lambda w: w.add_sliding_window_pattern([True, False, False, True, True, False]))
    assert "not periodic" in _one_line_error(str(bad), UnsupportedModelError)


def test_bad_dtype(llama_gguf):
    with pytest.raises(ModelLoadError, match="unsupported dtype"):
        load_model(str(llama_gguf[0]), dtype="int8")
