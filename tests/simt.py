"""The fused kernels' CUDA source, run on the CPU: a stand-in for `mx.fast.cuda_kernel`.

CI has no GPU, so the generated CUDA text itself (header and body, exactly as codec/kernels/ makes
them) is compiled with the host C++ compiler against a small SIMT harness: every warp runs as 32
threads that meet at a barrier in each shuffle and ballot, `blockIdx` / `threadIdx` are per-thread
values, `__device__` tables are plain globals, float16 is `_Float16`. Outputs start filled with
NaN (floats) or 0xA5 (bytes), so an element a kernel forgets to write shows up.

What this checks: the kernels' arithmetic, indexing, lane layout and shuffles, and the host code
that builds their launches. What it cannot: CUDA-only compile errors, timing, memory-model
subtleties. The GPU checks (`python -m promptvault.bench.kernels --check`) stay the reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

import mlx.core as mx
import numpy as np

CXX = shutil.which("g++") or shutil.which("c++")

_NP = {mx.uint8: np.uint8, mx.int32: np.int32, mx.uint16: np.uint16, mx.float16: np.float16,
       mx.float32: np.float32}
_C = {np.dtype(np.uint8): "uint8_t", np.dtype(np.int32): "int32_t", np.dtype(np.uint16): "uint16_t",
      np.dtype(np.float16): "_Float16", np.dtype(np.float32): "float"}

_PRELUDE = r"""
#include <cstdint>
#include <cmath>
#include <thread>
#include <barrier>
#include <vector>
struct pv_dim3 { unsigned int x, y, z; };
static thread_local pv_dim3 threadIdx, blockIdx;
static pv_dim3 blockDim;
struct pv_warp { std::barrier<>* bar; float f[32]; unsigned int u[32]; };
static thread_local pv_warp* pv_w;
static thread_local unsigned int pv_lane_id;
static float pv_shfl_xor(float v, unsigned int m) {
  pv_w->f[pv_lane_id] = v; pv_w->bar->arrive_and_wait();
  const float r = pv_w->f[(pv_lane_id ^ m) & 31u]; pv_w->bar->arrive_and_wait(); return r; }
static unsigned int pv_ballot(bool p) {
  pv_w->u[pv_lane_id] = p ? 1u : 0u; pv_w->bar->arrive_and_wait();
  unsigned int r = 0u; for (int i = 0; i < 32; ++i) r |= pv_w->u[i] << i;
  pv_w->bar->arrive_and_wait(); return r; }
#define __device__
#define __shfl_xor_sync(mask, v, m) pv_shfl_xor((v), (m))
#define __ballot_sync(mask, p) pv_ballot(p)
"""

launches: list[str] = []  # kernel names, in launch order (tests assert which kernels ran)


def _compile(code: str) -> ctypes.CDLL:
    tag = hashlib.sha256(code.encode()).hexdigest()[:20]
    lib = os.path.join(tempfile.gettempdir(), f"pv_simt_{tag}.so")
    if not os.path.exists(lib):
        src = lib[:-3] + ".cpp"
        with open(src, "w") as f:
            f.write(code)
        tmp = f"{lib}.{os.getpid()}"
        subprocess.run([CXX, "-std=c++20", "-O1", "-fno-strict-aliasing", "-w", "-shared", "-fPIC", "-pthread",
                        src, "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, lib)
    return ctypes.CDLL(lib)


def cuda_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True, **_):
    """Same signature as mx.fast.cuda_kernel; the returned callable runs on the CPU."""

    def launch(inputs, template, grid, threadgroup, output_shapes, output_dtypes, **__):
        arrays = [np.ascontiguousarray(np.array(a)) for a in inputs]
        outs = []
        for shape, dtype in zip(output_shapes, output_dtypes):
            dt = np.dtype(_NP[dtype])
            outs.append(np.full(shape, np.nan if dt.kind == "f" else 0xA5, dtype=dt))
        (tname, tdtype), = template
        params = [f"const {_C[a.dtype]}* {n}" for n, a in zip(input_names, arrays)]
        params += [f"{_C[o.dtype]}* {n}" for n, o in zip(output_names, outs)]
        args = [f"(const {_C[a.dtype]}*)p[{i}]" for i, a in enumerate(arrays)]
        args += [f"({_C[o.dtype]}*)p[{len(arrays) + i}]" for i, o in enumerate(outs)]
        code = (_PRELUDE + header + f"\ntemplate <typename {tname}>\nstatic void pv_kernel({', '.join(params)}) {{\n"
                + source + "\n}\n" + r"""
extern "C" void pv_run(void** p, unsigned int threads, unsigned int tg) {
  blockDim = {tg, 1u, 1u};
  for (unsigned int b = 0; b < threads / tg; ++b)
    for (unsigned int w = 0; w < tg / 32u; ++w) {
      std::barrier<> bar(32); pv_warp ctx; ctx.bar = &bar;
      std::vector<std::thread> ts;
      for (unsigned int l = 0; l < 32u; ++l) ts.emplace_back([&, l]() {
        pv_w = &ctx; pv_lane_id = l; threadIdx = {w * 32u + l, 0u, 0u}; blockIdx = {b, 0u, 0u};
        pv_kernel<""" + _C[np.dtype(_NP[tdtype])] + ">(" + ", ".join(args) + """);
      });
      for (auto& t : ts) t.join();
    }
}
""")
        assert grid[0] % threadgroup[0] == 0 and threadgroup[0] % 32 == 0
        lib = _compile(code)
        ptrs = (ctypes.c_void_p * (len(arrays) + len(outs)))(*[a.ctypes.data for a in arrays + outs])
        lib.pv_run(ptrs, ctypes.c_uint(grid[0]), ctypes.c_uint(threadgroup[0]))
        launches.append(name)
        return [mx.array(o) for o in outs]

    return launch
