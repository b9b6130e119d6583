"""Fused GPU kernels for the TurboQuant codec: encode and decode each in one pass over the data.

Rooms: `layout` (which specs and head dims the kernels take, lane layouts, the part plan of a
vector), `source` (kernel text: one body for CUDA and Metal; encode and the plain decode),
`plan_source` (the plan decode of outlier splits), `launch` (compiled kernels and their
launches), `checks` (comparisons with the reference), `choice` (the backend per process, with
the self-check before first use). Callers use the names below.
"""

from promptvault.codec.kernels.choice import backend, reset, use_fused
from promptvault.codec.kernels.checks import codes_match, config_check, self_check
from promptvault.codec.kernels.launch import clear_kernels, decode_rows_with, encode_arrays_with
from promptvault.codec.kernels.layout import (KNOBS, DecodePlan, KernelConfig, arrays_fit, decode_plan,
                                              identity_map, supports, uses_plan_kernel)

__all__ = ["backend", "reset", "use_fused", "codes_match", "config_check", "self_check", "clear_kernels",
           "decode_rows_with", "encode_arrays_with", "KNOBS", "DecodePlan", "KernelConfig", "arrays_fit",
           "decode_plan", "identity_map", "supports", "uses_plan_kernel"]
