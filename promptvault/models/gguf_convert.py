"""GGUF file -> mlx-lm model directory (config.json, model.safetensors, tokenizer files).

mlx-lm cannot read GGUF. Every tensor is dequantized to float32 with the `gguf` package (which
handles all llama.cpp quant types in numpy), renamed and un-transformed per architecture, and
stored in the requested dtype, so the result loads with plain `mlx_lm.load`. Quantization is
not carried over: the point is a model mlx can run, with the GGUF's trained weights.
"""

import json
from pathlib import Path

import mlx.core as mx

from promptvault.models.gguf_arch import arch_spec, model_config
from promptvault.models.gguf_file import GGUFFile
from promptvault.models.gguf_tokenizer import write_tokenizer

WEIGHTS_FILE = "model.safetensors"


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: mx.Dtype) -> dict:
    """Write an mlx-lm directory for `gguf_path` into the existing, empty `out_dir`; return its config."""
    g = GGUFFile(gguf_path)
    spec = arch_spec(g)
    config = model_config(g, spec)
    write_tokenizer(g, out_dir)  # before the weights: a tokenizer problem fails fast
    weights = {}
    for tensor in g.tensors:
        if tensor.name in spec.config_tensors:  # already checked and folded into config
            continue
        name = spec.mlx_name(tensor.name)
        array = spec.transform(tensor.name, g.dequantized(tensor), config)
        weights[name] = mx.array(array).astype(dtype)
    mx.save_safetensors(str(out_dir / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return config
