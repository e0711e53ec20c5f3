"""Kernel selection: for each group of same-shaped ``RealLinear`` layers, a layout and a kernel per phase.

``select_kernels`` checks every candidate (``RealLinear.candidates``) against the simulated
arithmetic on random inputs, times it (CUDA-graph replay cycling over layers of the shape, so
weights come from memory), and then picks the layout whose best kernels minimise the workload's
time (``plan``: phases, rows and how often each runs per generate) -- one layout per layer, so the
weights are held once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from . import fused
from .fused import InputMode, Prepared
from .real import (KERNELS, LAYOUT_MARGIN, LAYOUT_PREFERENCE, OPT_IN_KERNELS, RealLinear, act_fake,
                   admissible_layouts, quantizer_ties, rel_err, sync_error)

KERNEL_TOL = 1e-2  # relative error of a kernel against the simulated arithmetic on random inputs
CYCLE = 8  # layers of a shape cycled through when timing (more weight bytes than the L2 cache)


# ---------------------------------------------------------------------------- records

@dataclass
class KernelRecord:
    """What ``select_kernels`` found for one group of same-shaped layers and one phase."""

    phase: str
    rows: int
    shape: tuple[int, int]
    chosen: str
    candidates: dict[str, dict] = field(default_factory=dict)
    quantizer: dict | None = None  # activation quantizer vs the simulated model's (quantizer_ties)
    layout: str | None = None  # the layout the group keeps (one per layer)
    layout_costs: dict | None = None  # workload time per feasible layout (ms per generate, per layer)
    wider_layouts: dict | None = None  # the same for layouts wider than the codes' storage, not chosen
    runs: float | None = None  # how often this phase runs per generate (the objective's weight)


# ---------------------------------------------------------------------------- kernel selection

def _signature(layer: RealLinear) -> tuple:
    act = None if layer.act is None else tuple(sorted(layer.act.to_meta().items()))
    group = None if layer.fmt == "float" else layer.scale.shape[1]
    return (layer.fmt, layer.bits, layer.in_features, layer.out_features, group, act)


def _time_ms(fn, reps: int, device) -> float:
    if str(device).startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps




def _time_graph_ms(fn, reps: int, device) -> float:
    """GPU time of ``fn`` (already warm) from replays of a CUDA graph of it: no launch overhead."""
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    del g
    return start.elapsed_time(end) / reps




def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _inputs_for(first: RealLinear, x: torch.Tensor, quantizer: dict | None) -> dict:
    """The candidates' inputs for a random ``x``: fake-quantized and codes, as the producers make them."""
    if first.act is None:
        return {"float": x, "fake": x}
    out = {"float": x, "fake": Prepared("fake", act_fake(x, first.act))}
    comp = first.int_compute()
    if comp is not None:
        out["codes"] = fused.rows_q(x, first.act, InputMode("codes", fp8=comp == "fp8", rowsum=first.corr))
    return out


def select_kernels(layers: list[RealLinear], phase: str | None = None, rows: int | None = None, *,
                   dtype: torch.dtype, plan: list[tuple[str, int, float]] | None = None,
                   only: list[str] | None = None, reps: int = 5, seed: int = 0,
                   wide_layouts: bool = False, log=None) -> list[KernelRecord]:
    """Pick, for each group of same-shaped layers, a layout and the fastest correct kernel per phase.

    ``plan``: ``(phase, rows, runs per generate)`` triples (default: ``phase`` x ``rows`` once).
    Each candidate runs on a random ``[rows, in]`` input: relative error against the simulated
    arithmetic of the same layer must be within ``KERNEL_TOL`` (with an activation quantizer,
    that arithmetic uses the engine's quantizer, after checking that it differs from the simulated
    model's at rounding ties only: ``quantizer_ties``); timing cycles through up to ``CYCLE``
    layers of the group, so that weights come from memory as in a real forward pass, not from the
    cache. The group then keeps the layout whose best kernels minimise
    ``sum(runs x time)`` over the plan. ``only`` restricts the candidates (names or prefixes) for
    experiments; naming an opt-in kernel (``OPT_IN_KERNELS``) adds it instead. Layouts wider than
    the codes' storage are tried (their times recorded) but chosen only with ``wide_layouts``; the
    choice is the most preferred layout within ``LAYOUT_MARGIN`` of the fastest (``_choose_layout``).
    """
    plan = plan or [(phase, rows, 1.0)]
    opt_in = [o for o in (only or ()) if o in OPT_IN_KERNELS]
    filters = [o for o in (only or ()) if o not in OPT_IN_KERNELS]
    groups: dict[tuple, list[RealLinear]] = {}
    for layer in layers:
        layer.act_dtype = dtype
        groups.setdefault(_signature(layer), []).append(layer)
    records = []
    gens: dict = {}
    for sig, members in groups.items():
        first = members[0]
        device = first.device
        cycle = members[: max(1, min(len(members), CYCLE))]
        recs: dict[str, KernelRecord] = {}
        for ph, n_rows, _w in plan:
            if first.fmt != "float":
                first.restore_ours()
            if str(device) not in gens:  # drawn on the device: prefill inputs reach 20k x 14k values
                gens[str(device)] = torch.Generator(device=device).manual_seed(seed)
            x = torch.randn(n_rows, first.in_features, generator=gens[str(device)], device=device).to(dtype)
            rec = KernelRecord(phase=ph, rows=n_rows, shape=(first.out_features, first.in_features), chosen="",
                               runs=_w)
            recs[ph] = rec
            with torch.no_grad():
                if first.act is not None:
                    # the simulated arithmetic with the engine's activation quantizer, which may differ
                    # from the eager one at rounding ties only (checked here, recorded in the record)
                    rec.quantizer = quantizer_ties(x, first.act)
                    if rec.quantizer["non_tie"]:
                        raise RuntimeError(f"the engine's activation quantizer differs from the simulated "
                                           f"model's beyond rounding ties for {sig}: {rec.quantizer}")
                inputs = _inputs_for(first, x, rec.quantizer)
                ref = first.run("simulated", inputs["fake"]) if first.fmt != "float" else first.simulated(x)
            names = first.candidates(ph, device, opt_in=opt_in, dtype=dtype)
            best = math.inf
            for name in names:
                if filters and not any(name.startswith(o) for o in filters) and name not in (
                        "simulated", "dequant+torch", "dequant+cublas"):
                    continue
                rec.candidates[name] = _try_candidate(name, first, cycle, inputs, ref, reps, device, best)
                best = min(best, rec.candidates[name].get("ms", math.inf))
        if first.fmt != "float" and str(device).startswith("cuda"):
            for ph, n_rows, _w in plan:
                recs[ph].candidates.update(_reference_timings(first, ph, n_rows, dtype, reps))
        _choose_layout(members, recs, plan, sig, admissible_layouts(first.bits, wide_layouts))
        for m in cycle:
            for lay in list(m.layouts):  # free what the choice does not use before the next group
                if lay not in m.layouts_in_use() and not (lay == "gemlite" and "gemlite-fp8" in m.layouts_in_use()):
                    del m.layouts[lay]
        if log:
            for rec in recs.values():
                log(f"  {rec.phase:7s} rows={rec.rows:<6d} {rec.shape} -> {rec.chosen} [{rec.layout}]  "
                    + ", ".join(f"{k}={v['ms'] * 1e3:.1f}us/{v.get('rel_err', float('nan')):.1e}"
                                if "ms" in v else f"{k}=FAIL({v.get('error', '')[:60]})"
                                for k, v in rec.candidates.items()))
        records.extend(recs.values())
    return records


SLOW = 10.0  # a candidate this many times slower than the best so far is timed by one call only


def _try_candidate(name: str, first: RealLinear, cycle, inputs: dict, ref, reps: int, device,
                   best_ms: float = math.inf) -> dict:
    info: dict = {"layout": KERNELS[name].layout}
    k = KERNELS[name]
    inp = inputs.get(k.input) if k.input != "codes" else inputs.get("codes")
    if inp is None:
        return {**info, "error": f"no {k.input} input for this layer"}
    try:
        with torch.no_grad():
            out = first.run(name, inp)
            info["rel_err"] = rel_err(out, ref)
            if name.startswith("torch-scaled_mm") and first.notes.get("scaled_mm_out"):
                info["out"] = first.notes["scaled_mm_out"]
            if info["rel_err"] > KERNEL_TOL:
                info["error"] = f"relative error {info['rel_err']:.2e} > {KERNEL_TOL}"
                return info
            once = _time_ms(lambda: first.run(name, inp), 1, device)
            if once > max(SLOW * best_ms, 1.0):  # hopeless here (tinygemm at prefill): spare the time
                info["ms"], info["timing"] = once, "one call (over 10x the best so far)"
                return info
            for m in cycle:
                # warm-up: autotune, compile, and per-layer set-up (layouts) outside the CUDA graph,
                # which would otherwise replay it
                m.run(name, inp)

            def go():
                for m in cycle:
                    m.run(name, inp)
            if str(device).startswith("cuda"):
                bad = sync_error(lambda: first.run(name, inp))
                if bad:
                    raise RuntimeError(f"synchronizes, cannot be graph-captured: {bad}")
                info["ms"] = _time_graph_ms(go, reps, device) / len(cycle)
            else:
                info["ms"] = _time_ms(go, reps, device) / len(cycle)
    except Exception as exc:  # noqa: BLE001 - a failing candidate is recorded, not fatal
        info["error"] = _short(exc)
    return info


def _choose_layout(members, recs: dict[str, KernelRecord], plan, sig,
                   allowed: tuple[str, ...] = LAYOUT_PREFERENCE, margin: float = LAYOUT_MARGIN) -> None:
    """Among the ``allowed`` layouts with a working kernel in every phase, the most preferred one whose
    ``sum(runs x best time)`` over the plan is within ``margin`` of the lowest; its best kernel per phase."""
    best_in: dict[str, dict[str, tuple[float, str]]] = {}  # layout -> phase -> (ms, kernel)
    for ph, rec in recs.items():
        for name, info in rec.candidates.items():
            if "ms" not in info or info.get("timing_only"):
                continue
            lay = info["layout"]
            cur = best_in.setdefault(lay, {}).get(ph)
            if cur is None or info["ms"] < cur[0]:
                best_in[lay][ph] = (info["ms"], name)
    costs = {}
    for lay, per in best_in.items():
        if all(ph in per for ph, _r, _w in plan):
            costs[lay] = sum(w * per[ph][0] for ph, _r, w in plan)
    usable = {lay: c for lay, c in costs.items() if lay in allowed}
    if not usable:
        raise RuntimeError(f"no layout among {allowed} has a working kernel in every phase for {sig} "
                           f"(working: {sorted(costs)}): "
                           f"{ {ph: r.candidates for ph, r in recs.items()} }")
    fastest = min(usable.values())
    rank = {lay: i for i, lay in enumerate(LAYOUT_PREFERENCE)}
    layout = min((lay for lay, c in usable.items() if c <= fastest * (1 + margin)),
                 key=lambda lay: (rank.get(lay, len(rank)), usable[lay]))
    for ph, rec in recs.items():
        rec.layout = layout
        rec.layout_costs = usable
        rec.wider_layouts = {lay: c for lay, c in costs.items() if lay not in usable} or None
        rec.chosen = best_in[layout][ph][1]
        for m in members:
            m.choice[ph] = rec.chosen


def _reference_timings(layer: RealLinear, phase: str, rows: int, dtype, reps: int) -> dict:
    """Timing-only comparisons on the same shape (never selected; values are random).

    ``ref-cublas``: the float layer this one replaces, cycling over 8 random weights so that they
    come from memory. ``ref-torch-int4pack-bf16``: torch's tinygemm on bf16 input (groups of 128),
    for W4 decode: what it costs where the state allows it (``tinygemm_exact``).
    """
    out = {}
    dev = layer.device
    N, K = layer.out_features, layer.in_features
    x = torch.randn(rows, K, device=dev, dtype=dtype)
    try:
        ws = [torch.randn(N, K, device=dev, dtype=dtype) for _ in range(CYCLE)]

        def go():
            for w in ws:
                F.linear(x, w)
        go()
        out["ref-cublas"] = {"ms": _time_graph_ms(go, reps, dev) / len(ws), "timing_only": True}
        del ws
    except Exception as exc:  # noqa: BLE001
        out["ref-cublas"] = {"error": _short(exc), "timing_only": True}
    if layer.fmt == "int4" and phase == "decode" and K % 128 == 0 and N % 8 == 0:
        try:
            xb = x.to(torch.bfloat16)
            packs = [torch._convert_weight_to_int4pack(
                torch.randint(0, 256, (N, K // 2), device=dev, dtype=torch.uint8), 8) for _ in range(CYCLE)]
            sz = torch.randn(K // 128, N, 2, device=dev, dtype=torch.bfloat16)

            def go4():
                for p in packs:
                    torch._weight_int4pack_mm(xb, p, 128, sz)
            go4()
            out["ref-torch-int4pack-bf16"] = {"ms": _time_graph_ms(go4, reps, dev) / len(packs),
                                              "timing_only": True}
        except Exception as exc:  # noqa: BLE001
            out["ref-torch-int4pack-bf16"] = {"error": _short(exc), "timing_only": True}
    return out
