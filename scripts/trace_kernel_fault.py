"""Run ``qvlm-bench perf`` with every kernel candidate traced: its name, layer shape and rows are
printed (flushed) before it runs and its outcome after a device synchronize, so that a CUDA fault
(an illegal memory access poisons the whole process) names the candidate that caused it.

usage: CUDA_LAUNCH_BLOCKING=1 python scripts/trace_kernel_fault.py PERF-ARGS...
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> int:
    import torch

    from harness.kernels import select as real
    original = real._try_candidate

    def traced(name, first, cycle, inputs, ref, reps, device, best_ms=math.inf):
        rows = inputs["float"].shape[0]
        print(f"[trace] try {name} shape=({first.out_features}, {first.in_features}) bits={first.bits} "
              f"rows={rows}", flush=True)
        info = original(name, first, cycle, inputs, ref, reps, device, best_ms)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        print(f"[trace] done {name} rows={rows}: {info.get('error') or 'ok'}", flush=True)
        return info

    real._try_candidate = traced
    if not any(a == "--isolate" or a.startswith("--isolate=") for a in argv):
        argv = [*argv, "--isolate", "off"]  # the tracing lives in this process, and so must the fault
    from harness.perf.command import main as perf_main
    return perf_main(argv) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
