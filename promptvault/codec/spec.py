"""What a stored tensor was coded with: recorded in every shard so any reader can decode it.

One name grammar prints and parses every codec, so the CLI (`--codec`), the benchmarks and
`promptvault stats` all speak it:

    CodecSpec   <bits>[c][n8][o<percent>x<bits>][r<seed>]   or  lossless  (l inside a KVCodec name)
                c: centered; n8: 8-bit log norms; o..x..: outlier split; r: rotation seed (0 if absent)
                e.g. 4cn8o25x6: 4 bits, centered, 8-bit log norms, the loudest 25% of channels at 6 bits
    KVCodec     k<spec>-v<spec>[-s<sinks>]                   or  lossless  (both lossless, no sinks)
                e.g. k4cn8o25x6-v3n8-s1 (DEFAULT_CODEC)

`str(x)` gives the name and `type(x).parse(str(x)) == x` for every codec.
"""

import re
from dataclasses import dataclass

TURBOQUANT_ID = "turboquant/1"
LOSSLESS_ID = "lossless/1"


@dataclass(frozen=True)
class CodecSpec:
    """How one stream of vectors (keys, or values) is coded.

    bits: 1..8 for TurboQuant; None keeps the original dtype bytes (lossless).
    seed: selects the random signs of the rotation (recorded, so decoding rebuilds them).
    center: subtract the mean over the token axis before coding and store it; it removes the
        per-channel offset that outlier-heavy keys carry, which the rotation would otherwise
        spread as error over every coordinate.
    norm_bits: 16 stores each norm as float16; 8 stores its logarithm in 8 bits on a scale set
        per coded tensor (one range per head and rotation block). At head dim 64 a float16 norm
        is a quarter bit per coordinate, so 8 bits buy 4% of size for ~0.5% rms norm error,
        small next to the direction's error at 2–4 bits.
    outliers, outlier_bits: the outlier-channel split of the TurboQuant paper. Per coded tensor
        and head, the share `outliers` (0 < share < 1) of the channels with the most energy over
        the tokens (after centering) is coded apart, with its own rotation, norm and
        `outlier_bits`-bit codebook; the other channels with `bits`. The count is the share of
        the head dim rounded to a multiple of 8 (at least 8): 0.25 → 16 of 64, 64 of 256.
        Channel indices are stored (one byte each per head). 0: off.
    """

    bits: int | None
    seed: int = 0
    center: bool = False
    norm_bits: int = 16
    outliers: float = 0.0
    outlier_bits: int = 0

    def __post_init__(self):
        if self.bits is not None:
            if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
                raise ValueError(f"bits must be an integer in 1..8 (or None for lossless), got {self.bits!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.norm_bits not in (8, 16):
            raise ValueError(f"norm_bits must be 8 or 16, got {self.norm_bits!r}")
        if isinstance(self.outliers, bool) or not isinstance(self.outliers, (int, float)) or not 0 <= self.outliers < 1:
            raise ValueError(f"outliers must be a share of the channels in [0, 1), got {self.outliers!r}")
        if isinstance(self.outlier_bits, bool) or not isinstance(self.outlier_bits, int) or self.outlier_bits < 0:
            raise ValueError(f"outlier_bits must be a non-negative integer, got {self.outlier_bits!r}")
        if self.outliers and (self.bits is None or not 1 <= self.outlier_bits <= 8):
            raise ValueError(f"an outlier split needs coded bits and outlier_bits in 1..8, "
                             f"got outliers={self.outliers} outlier_bits={self.outlier_bits}")
        if not self.outliers and self.outlier_bits:
            raise ValueError("outlier_bits without outliers")

    @property
    def lossless(self) -> bool:
        return self.bits is None

    @property
    def codec_id(self) -> str:
        return LOSSLESS_ID if self.lossless else TURBOQUANT_ID

    def to_json(self) -> dict:
        if self.lossless:
            return {"codec": LOSSLESS_ID}
        data = {"codec": TURBOQUANT_ID, "bits": self.bits, "seed": self.seed, "center": self.center}
        if self.norm_bits != 16:  # absent means float16, as in shards written before the option
            data["norm_bits"] = self.norm_bits
        if self.outliers:  # absent means no split, as in shards written before the option
            data["outliers"], data["outlier_bits"] = self.outliers, self.outlier_bits
        return data

    @classmethod
    def from_json(cls, data: dict) -> "CodecSpec":
        codec = data.get("codec")
        if codec == LOSSLESS_ID:
            return cls(bits=None)
        if codec == TURBOQUANT_ID:
            return cls(bits=int(data["bits"]), seed=int(data["seed"]), center=bool(data["center"]),
                       norm_bits=int(data.get("norm_bits", 16)), outliers=float(data.get("outliers", 0.0)),
                       outlier_bits=int(data.get("outlier_bits", 0)))
        raise ValueError(f"unknown codec {codec!r} (this promptvault reads {TURBOQUANT_ID}, {LOSSLESS_ID})")

    def __str__(self) -> str:
        if self.lossless:
            return "lossless"
        return (f"{self.bits}" + ("c" if self.center else "") + ("n8" if self.norm_bits == 8 else "")
                + (f"o{_percent(self.outliers)}x{self.outlier_bits}" if self.outliers else "")
                + (f"r{self.seed}" if self.seed else ""))

    @classmethod
    def parse(cls, name: str) -> "CodecSpec":
        """The spec a name of the module docstring's grammar stands for; ValueError otherwise."""
        if name in ("lossless", "l"):
            return cls(bits=None)
        m = _SPEC_NAME.match(name)
        if not m:
            raise ValueError(f"{name!r} is not a codec spec (e.g. 4c, 3n8, 4cn8o25x6, lossless)")
        bits, center, norm8, outliers, outlier_bits, seed = m.groups()
        return cls(bits=int(bits), center=bool(center), norm_bits=8 if norm8 else 16,
                   outliers=float(outliers or 0) / 100, outlier_bits=int(outlier_bits or 0), seed=int(seed or 0))

    def outlier_channels(self, dim: int) -> int:
        """How many channels of a head dim the outlier split codes apart (0: no split)."""
        if not self.outliers:
            return 0
        k = max(8, int(round(self.outliers * dim / 8)) * 8)
        if k >= dim:
            raise ValueError(f"an outlier share of {self.outliers} leaves no channels of head dim {dim}")
        return k


_SPEC_NAME = re.compile(r"^(\d+)(c?)(n8)?(?:o(\d+(?:\.\d+)?)x(\d+))?(?:r(\d+))?$")
_KV_NAME = re.compile(r"^k([^-]+)-v([^-]+)(?:-s(\d+))?$")


def _percent(share: float) -> str:
    """An outlier share as the percent the name carries: 0.25 -> "25", 0.125 -> "12.5"."""
    return format(round(100 * share, 6), "g")


LOSSLESS = CodecSpec(bits=None)


@dataclass(frozen=True)
class KVCodec:
    """Separate specs for keys and values: keys dominate the attention error, values are cheap.

    sinks: the first `sinks` tokens of a prompt (attention sinks: the tokens every later query
        attends to most, whose keys carry the largest norms) are stored losslessly in the block
        that holds them, the rest of that block with `keys` / `values`. Costs a few rows once per
        prompt, not per block. Recorded in the JSON only when nonzero (old shards: 0).
    """

    keys: CodecSpec
    values: CodecSpec
    sinks: int = 0

    def __post_init__(self):
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks must be a non-negative integer, got {self.sinks!r}")

    def to_json(self) -> dict:
        data = {"keys": self.keys.to_json(), "values": self.values.to_json()}
        if self.sinks:  # absent means 0, as in shards written before the option
            data["sinks"] = self.sinks
        return data

    @classmethod
    def from_json(cls, data: dict) -> "KVCodec":
        return cls(keys=CodecSpec.from_json(data["keys"]), values=CodecSpec.from_json(data["values"]),
                   sinks=int(data.get("sinks", 0)))

    def __str__(self) -> str:
        if self.keys.lossless and self.values.lossless and not self.sinks:
            return "lossless"
        part = lambda spec: "l" if spec.lossless else str(spec)  # noqa: E731
        return f"k{part(self.keys)}-v{part(self.values)}" + (f"-s{self.sinks}" if self.sinks else "")

    @classmethod
    def parse(cls, name: str) -> "KVCodec":
        """The codec a name of the module docstring's grammar stands for; ValueError otherwise."""
        if name == "lossless":
            return cls(LOSSLESS, LOSSLESS)
        m = _KV_NAME.match(name)
        if not m:
            raise ValueError(f"{name!r} is not a codec name (e.g. k4c-v3, k4cn8o25x6-v3n8-s1, lossless)")
        return cls(CodecSpec.parse(m.group(1)), CodecSpec.parse(m.group(2)), sinks=int(m.group(3) or 0))


# Chosen by `promptvault bench fidelity` on SmolLM2-135M and Gemma-3-270M (docs: choosing bits):
# centered 4-bit keys whose loudest quarter of channels per head get 6 bits (outlier split),
# 3-bit values, 8-bit log norms, the first prompt token (attention sink) lossless.
DEFAULT_CODEC = KVCodec.parse("k4cn8o25x6-v3n8-s1")
