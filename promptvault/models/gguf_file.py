"""Open a GGUF file and read its metadata, turning every way a file can be broken into one error.

gguf.GGUFReader memory-maps the file and fails with assorted exceptions (ValueError on a bad
magic, IndexError or struct errors on a truncated header, numpy errors on missing tensor
data); callers should see a single ModelLoadError that names the file.
"""

from pathlib import Path

import gguf
import numpy as np

from promptvault.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"


class GGUFFile:
    """A readable GGUF file: metadata as plain Python values, tensors as the reader lists them."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ModelLoadError(f"{self.path} is not a GGUF file (it does not start with 'GGUF')")
        try:
            self._reader = gguf.GGUFReader(self.path, "r")
            self.metadata = {name: field.contents() for name, field in self._reader.fields.items()}
            self.tensors = list(self._reader.tensors)
        except Exception as exc:  # noqa: BLE001 - any parse failure means a broken file
            raise ModelLoadError(f"{self.path} is truncated or corrupt: {type(exc).__name__}: {exc}") from None
        self._check_tensor_data_present()

    def _check_tensor_data_present(self) -> None:
        """A file cut short inside the tensor data still parses; its last tensor then overruns the end."""
        size = self.path.stat().st_size
        end = max((t.data_offset + t.n_bytes for t in self.tensors), default=0)
        if end > size:
            raise ModelLoadError(f"{self.path} is truncated: tensor data needs {end} bytes, file has {size}")

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "")

    def arch_value(self, key: str, default=None):
        """Value of `<architecture>.<key>`, e.g. arch_value("block_count")."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def dequantized(self, tensor) -> np.ndarray:
        """The tensor as float32 in numpy (row-major, PyTorch) order, whatever its quant type."""
        try:
            return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(
                f"{self.path}: cannot dequantize tensor {tensor.name} ({tensor.tensor_type.name}): {exc}"
            ) from None
