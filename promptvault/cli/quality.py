"""`--quality exact|high|balanced|small`: codec presets a person can choose without reading the
codec section. Each is a row of the fidelity tables in docs/fidelity.md (SmolLM2-135M-Instruct, 20 prompts ×
1,024 tokens, teacher-forced KL vs lossless; "vs fp16" counts every byte on disk of a float32 CPU
cache, so lossless is 0.50x there and 1x for a float16 cache):

  exact     `lossless`            lossless keys and values: restores bit-identical caches
  high      `k8c-v4`              2.53x, KL 0.0015, top-1 97.8%
  balanced  `k4cn8o25x6-v3n8-s1`  3.93x, KL 0.0059, top-1 95.3% (the vault's default codec)
  small     `k3c-v2`              5.67x, KL 0.0771, top-1 85.4% (the smallest setting on the
                                  Pareto front with KL < 0.1; 2-bit keys cost 3.6x more KL)

This module is the one place that maps the names to codecs: the CLI options, `run --help` and
`stats` all read QUALITY.
"""

from dataclasses import dataclass

from promptvault import DEFAULT_CODEC, KVCodec


@dataclass(frozen=True)
class Quality:
    name: str
    setting: str  # the codec's name: the fidelity-table row that backs it
    summary: str  # ratio and KL on SmolLM2, from that row

    @property
    def codec(self) -> KVCodec:
        return KVCodec.parse(self.setting)


QUALITY = {q.name: q for q in (
    Quality("exact", "lossless", "lossless"),
    Quality("high", "k8c-v4", "2.5x, KL 0.0015"),
    Quality("balanced", str(DEFAULT_CODEC), "3.9x, KL 0.0059 (default)"),
    Quality("small", "k3c-v2", "5.7x, KL 0.077"),
)}

HELP = "Codec preset: " + "; ".join(f"{q.name} = {q.summary}" for q in QUALITY.values()) + \
    " (README: Using it, quality presets)."


def quality_of(codec: str | None) -> str | None:
    """The preset whose codec is named `codec`, or None (another codec)."""
    return next((q.name for q in QUALITY.values() if q.setting == codec), None)
