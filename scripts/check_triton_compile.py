"""Compile harness/perf's Triton kernels for an H100/H200 (sm_90) on a machine without a GPU.

Catches compile errors (unsupported operators, dtype mismatches, a Triton version's API) before
a kernel reaches the lent GPU; Triton ships ptxas, so no CUDA install is needed. Run it with the
device's Triton version installed (e.g. ``pip install triton==3.6.0`` in a scratch venv).
``--full``: every autotuning configuration and both row-block sizes (slow: minutes per core).
"""
import os
import sys
import traceback
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # real compiled kernels, not the interpreter's
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
FULL = "--full" in sys.argv
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from harness.kernels import fused  # noqa: E402
from harness.kernels import triton_matmul as tk  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
ok = fail = 0

def jit(k):
    while hasattr(k, "fn") and not isinstance(k, triton.runtime.jit.JITFunction):
        k = k.fn
    return k

def compile_one(kernel, types, consts, label):
    global ok, fail
    fn = jit(kernel)
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        else:
            sig[name] = types.get(name, "i32")
    try:
        triton.compile(ASTSource(fn, sig, constexprs=consts), target=TARGET,
                       options={"num_warps": consts.pop("_warps", 4) if "_warps" in consts else 4})
        ok += 1
    except Exception as e:
        fail += 1
        print("FAIL", label, type(e).__name__, str(e).splitlines()[:3] if str(e) else "")
        traceback.print_exc(limit=2)

# fused producers
for dt in ("fp16", "bf16"):
    for mode, bits, sym, pt, rowsum, out in [(0, 8, True, True, False, dt), (1, 4, True, True, False, dt),
                                             (2, 4, True, True, False, "fp8e4nv"), (2, 8, True, True, True, "i8"),
                                             (2, 6, True, True, True, "i8"), (1, 6, False, True, False, dt),
                                             (2, 8, True, False, False, "i8")]:
        common = dict(MODE=mode, BITS=bits, SYM=sym, PER_TOKEN=pt, ROWSUM=rowsum)
        ptrs = {"out_ptr": "*" + out, "scale_ptr": "*fp32", "rowsum_ptr": "*i32" if rowsum else "*fp32",
                "s_ptr": "*fp32", "z_ptr": "*fp32", "clip": "fp32", "eps": "fp32"}
        for block in (4096, 16384) if FULL else (4096,):
            compile_one(fused._norm_q_kernel, {**ptrs, "res_ptr": "*" + dt, "delta_ptr": "*" + dt, "w_ptr": "*" + dt,
                                               "res_out_ptr": "*" + dt},
                        dict(HAS_DELTA=True, BLOCK=block, **common), f"norm {dt} {common} {block}")
            compile_one(fused._silu_q_kernel, {**ptrs, "gu_ptr": "*" + dt}, dict(BLOCK=block, **common),
                        f"silu {dt} {common}")
            compile_one(fused._rows_q_kernel, {**ptrs, "x_ptr": "*" + dt}, dict(BLOCK=block, **common),
                        f"rows {dt} {common}")
# matmuls
for dt in ("fp16", "bf16"):
    for packed, group in ((True, 4096), (True, 128), (False, 4096)):
        for cfg in tk._dot_configs() if FULL else tk._dot_configs()[:1]:
            kw = dict(cfg.kwargs)
            compile_one(tk._wq_dot_kernel, {"x_ptr": "*" + dt, "w_ptr": "*u8" if packed else "*i8", "s_ptr": "*fp32",
                                            "z_ptr": "*fp32", "y_ptr": "*" + dt},
                        dict(PACKED=packed, GROUP=group, **kw), f"dot {dt} {packed} {group} {kw}")
        for cfg in tk._gemv_configs() if FULL else tk._gemv_configs()[:1]:
            compile_one(tk._wq_gemv_kernel, {"x_ptr": "*" + dt, "w_ptr": "*u8" if packed else "*i8", "s_ptr": "*fp32",
                                             "z_ptr": "*fp32", "y_ptr": "*" + dt},
                        dict(PACKED=packed, GROUP=group, BLOCK_M=1, **cfg.kwargs), f"gemv {dt}")
    for wfmt, fp8, corr in ((1, True, False), (0, False, True), (0, False, False), (1, False, False)):
        for cfg in tk._gemm_configs() if FULL else tk._gemm_configs()[:1]:
            compile_one(tk._scaled_gemm_kernel, {"a_ptr": "*fp8e4nv" if fp8 else "*i8", "w_ptr": "*u8" if wfmt == 1 else "*i8",
                                                 "zw_ptr": "*fp32", "sa_ptr": "*fp32", "sw_ptr": "*fp32", "rs_ptr": "*i32",
                                                 "y_ptr": "*" + dt},
                        dict(WFMT=wfmt, FP8=fp8, CORR=corr, **cfg.kwargs), f"gemm {dt} {wfmt} {fp8} {corr}")
print(f"compiled {ok}, failed {fail} (triton {triton.__version__}, sm_90)")
sys.exit(1 if fail else 0)
