"""Shared pieces of the perf tests: the Triton-interpreter fixture and quantized test layers."""

from __future__ import annotations

import importlib.util

import pytest
import torch


def triton_interpreter():
    """Run harness.perf's Triton kernels on CPU tensors for one test (skip where impossible)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (it is in the test extra: pip install -e '.[test]')")
    from harness.kernels import triton_matmul as tk

    if not tk.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 was not set before harness.perf was imported (tests/conftest.py "
                    "sets it where there is no GPU)")
    return tk


def rand_acts(rows: int, k: int, seed: int, dtype=torch.float16, outliers: bool = True) -> torch.Tensor:
    """Random activations with a few large channels, as LLMs have; never all zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    if outliers:
        cols = torch.randint(0, k, (max(1, k // 32),), generator=g)
        x[:, cols] *= 20
    return x.to(dtype)


@pytest.fixture()
def interp():
    """Triton's CPU interpreter switched on for one test (and back off after)."""
    tk = triton_interpreter()
    prev = tk.interpret_on_cpu(True)
    yield tk
    tk.interpret_on_cpu(prev)


def engine_on_cpu(lm, state, B, wl, *, float_params: bool = False, only=None):
    """The real-kernel engine of ``state`` (None: float) on the CPU, kernels chosen for ``B`` rows
    of decode and the workload's prefill, captured: the engine the gate tests check.
    ``float_params``: with the state's float parameters (rotations, folded norms); ``only``:
    ``select_kernels``' candidate filter (``["simulated"]`` where the producers are the subject)."""
    from harness.kernels.real import RealLinear
    from harness.kernels.select import select_kernels
    from harness.perf.engine import LlavaEngine, build_blocks, state_blocks

    def make(path, lin):
        lq = None if state is None else state.linears.get(path)
        if lq is None:
            return RealLinear.from_linear(lin, path)
        return RealLinear.from_quant(lq, lin, device="cpu", dtype=lm.dtype, name=path)
    if float_params and state is not None:  # the whole state, as the perf runner deploys it
        blocks = state_blocks(lm.model, state, device="cpu", dtype=lm.dtype)
        eng = LlavaEngine(lm.model, blocks, float_params=state.float_params)
    else:
        eng = LlavaEngine(lm.model, build_blocks(lm.model, make))
    ids, pix = wl.batch(B)
    eng.setup(ids, pix, wl.new_tokens)
    layers = [p for m in eng.linears().values() for p in getattr(m, "parts", [m])]
    for phase, rows in (("decode", B), ("prefill", B * ids.shape[1])):
        select_kernels(layers, phase, rows, dtype=lm.dtype, reps=1, only=only)
    eng.capture(warmup=1)
    return eng
