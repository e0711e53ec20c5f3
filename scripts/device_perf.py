"""The GPU side of ``scripts/device_perf.sh``: a kernel self-test and the run's summary.

``selftest``: every kernel candidate and every fused activation quantizer at the LLaVA-1.5-7B
layer shapes, on CUDA, against float64 arithmetic of the simulated model (relative error) and the
simulated quantizer (codes equal up to one step at exact rounding ties), and the fused online
Hadamard at QuaRot's widths (4096, 11008 = 344 · 32), timed as CUDA-graph replays against the eager
transform it replaces. Times are rough (one layer, 10 CUDA-event repetitions, weights may sit in
L2): correctness is the point; the perf run's kernel selection times properly. Writes JSON and prints one line per check; exit status 1 if any
check failed (a failed *candidate* is not fatal to the perf run, which skips it).

``summary``: the perf table of a records file (and the per-layer kernel choice at batch 1, from
the records' detail sidecars: ``harness.perf.detail``; a missing one is a note), printed last by
the device script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES_7B = [(12288, 4096), (4096, 11008)]  # 7B fused q/k/v and down: both input widths
TOL = 1e-2  # relative error against float64 (the selection's KERNEL_TOL)


def _rand(rows, k, seed, dtype, device, scale=1.0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * scale
    cols = torch.randint(0, k, (max(1, k // 64),), generator=g)
    x[:, cols] *= 20  # a few outlier channels, as LLM activations have
    return x.to(device=device, dtype=dtype)


def _time_us(fn, reps=10):
    """Mean µs per call: CUDA events after a warm-up (harness.kernels.real's timer); on the CPU one call."""
    import torch

    from harness.kernels.select import _time_ms

    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    fn()
    torch.cuda.synchronize()
    return _time_ms(fn, reps, "cuda") * 1e3


def _graph_us(fn, reps=20):
    """µs per replay of a CUDA graph of ``fn`` (already warm): launch gaps as in the engine's
    captured decode step; the capture itself fails for a kernel that is not graph-capturable."""
    from harness.kernels.select import _time_graph_ms

    return _time_graph_ms(fn, reps, "cuda") * 1e3


def _online_hadamard(res: dict, dev: str, widths, prefill_rows: int, heads: int, dry_cpu: bool) -> list:
    """The fused online Hadamard (``harness.kernels.hadamard``) at QuaRot's widths (o_proj's input,
    read through the attention output's transpose, and down_proj's, from the gate/up output):
    its transform against float64 and the eager one, its codes against the simulated quantizer on
    its own values, and CUDA-graph times of the fused kernel, of the eager path it replaces
    (transform + row quantizer) and of the producer a state without the transform runs
    (``rows_q`` / ``silu_mul_q``): the difference is what QuaRot's transform costs per layer."""
    import math

    import torch

    from harness.kernels import fused, hadamard
    from harness.kernels.fused import InputMode
    from harness.kernels.online import OnlineHadamard
    from harness.kernels.real import rel_err
    from harness.quant.state import ActQuant
    from harness.quant.transforms import _dense_factor, _sylvester, hadamard_factors

    out = []
    act = ActQuant(bits=4)
    for dtype in (torch.float16,) if dry_cpu else (torch.float16, torch.bfloat16):
        for n, silu in ((widths[0], False), (widths[1], True)):
            t = OnlineHadamard(n)
            m, p = hadamard_factors(n)
            for rows in (1, prefill_rows):
                name = (f"online hadamard {'silu·up' if silu else 'attention'} n={n} ({m}·{p}) rows={rows} "
                        f"{str(dtype)[6:]}")
                entry = {"name": name, "n": n, "rows": rows, "dtype": str(dtype)[6:], "plan": str(hadamard.plan(n))}
                try:
                    if silu:
                        x = _rand(rows, 2 * n, 5, dtype, dev, scale=2.0)
                        h = fused.silu_mul_q(x, None, fused.FLOAT_INPUT)
                    else:  # [B, H, T, D] as attention returns it, read through its transpose
                        att = _rand(heads * rows, n // heads, 6, dtype, dev).reshape(1, heads, rows, n // heads)
                        x = att.transpose(1, 2)
                        h = x.reshape(rows, n)
                    ht = hadamard.hadamard_q(x, t, None, silu=silu)
                    want = torch.einsum("ik,rij,jl->rkl", _dense_factor(m).to(dev), h.double().reshape(rows, m, p),
                                        _sylvester(p).to(dev)).reshape(rows, n) / math.sqrt(n)
                    entry["err_f64"] = rel_err(ht, want)
                    entry["err_eager"] = rel_err(ht, t(h))
                    entry["eager_err_f64"] = rel_err(t(h), want)
                    tol = 1e-3 if dtype == torch.float16 else 1e-2
                    ok = entry["err_f64"] <= tol and entry["err_eager"] <= tol
                    for mode in (InputMode("fake"), InputMode("codes", fp8=True)):
                        c = fused.check_codes(ht, hadamard.hadamard_q(x, t, act, mode, silu=silu), act)
                        entry[f"codes_{mode.kind}"] = {k: c[k] for k in ("mismatches", "non_tie", "scale_mismatch")}
                        ok = ok and not c["non_tie"] and not c["scale_mismatch"]
                    if not dry_cpu:
                        mode = InputMode("codes", fp8=True)
                        if silu:
                            base = lambda: fused.silu_mul_q(x, act, mode)  # noqa: E731
                        else:
                            base = lambda: fused.rows_q(x, act, mode)  # noqa: E731
                        eager = lambda: hadamard.eager_q(x, t, act, mode, silu=silu)  # noqa: E731
                        fast = lambda: hadamard.hadamard_q(x, t, act, mode, silu=silu)  # noqa: E731
                        for key, fn in (("fused_us", fast), ("eager_us", eager), ("no_transform_us", base)):
                            fn()
                            entry[key] = _graph_us(fn)
                        if hadamard.plan(n).m > 1:  # the split dense stage: each form and block size
                            entry["block_k_default"] = hadamard._block_k(rows)
                            entry["dense_default"] = hadamard._dense(rows, hadamard.plan(n))
                            entry["fused_block_k_us"] = {}
                            for form in hadamard.DENSES:
                                for bk in hadamard.BLOCK_KS:
                                    fn = lambda bk=bk, form=form: hadamard.hadamard_q(  # noqa: E731
                                        x, t, act, mode, silu=silu, block_k=bk, dense=form)
                                    own = hadamard.hadamard_q(x, t, None, silu=silu, block_k=bk, dense=form)
                                    c = fused.check_codes(own, fn(), act)  # codes on the form's own values
                                    if c["non_tie"] or c["scale_mismatch"]:
                                        ok = False
                                        entry.setdefault("form_errors", []).append(f"{form} bk={bk}: {c}")
                                    entry["fused_block_k_us"][f"{form}-{bk}"] = _graph_us(fn)
                        # what the engine's per-width choice makes of these two times (hadamard.pick)
                        entry["engine_choice"] = hadamard.pick(entry["fused_us"], entry["eager_us"])
                    entry["ok"] = bool(ok)
                except Exception as exc:  # noqa: BLE001
                    msg = str(exc).splitlines()[0][:300] if str(exc) else ""
                    entry.update(ok=False, error=f"{type(exc).__name__}: {msg}")
                    traceback.print_exc()
                out.append(entry)
                if not entry["ok"]:
                    res["failures"].append(name)
                times = (f" fused {entry['fused_us']:.1f}us eager {entry['eager_us']:.1f}us "
                         f"without transform {entry['no_transform_us']:.1f}us") if "fused_us" in entry else ""
                if "fused_block_k_us" in entry:
                    times += " block_k " + " ".join(f"{k}:{v:.1f}us" for k, v in entry["fused_block_k_us"].items())
                if "engine_choice" in entry:
                    times += f" -> engine picks {entry['engine_choice']}"
                print(f"[selftest] {'ok  ' if entry['ok'] else 'FAIL'} {name}: "
                      + (entry.get("error") or f"err f64 {entry['err_f64']:.1e} (eager {entry['eager_err_f64']:.1e}) "
                         f"vs eager {entry['err_eager']:.1e} non-tie {entry['codes_codes']['non_tie']}{times}"),
                      flush=True)
    return out


def selftest(out: Path, budget_s: float, dry_cpu: bool = False) -> int:
    """``dry_cpu``: the same checks on tiny shapes on the CPU through Triton's interpreter (CUDA-only
    kernels are then not candidates): a smoke test of this script without a GPU."""
    import torch

    from harness.kernels import fused, real
    from harness.kernels import gemlite_adapter as glk
    from harness.kernels.fused import InputMode, Prepared
    from harness.kernels.real import KERNELS, RealLinear, rel_err
    from harness.perf.measure import device_info
    from harness.quant.quantizer import rtn_weight
    from harness.quant.simulated import quantize_activation
    from harness.quant.state import ActQuant, LinearQuant

    t0 = time.time()
    dev = "cuda"
    hidden, inter, shapes, prefill_rows, heads = 4096, 11008, SHAPES_7B, 647, 32
    if dry_cpu:
        from harness.kernels import triton_matmul as tk

        if not tk.INTERPRET:
            raise SystemExit("--dry-cpu needs TRITON_INTERPRET=1 in the environment")
        tk.interpret_on_cpu(True)
        dev, hidden, inter, shapes, prefill_rows, heads = "cpu", 64, 96, [(192, 64), (64, 128)], 70, 2
    res: dict = {"device": device_info(dev), "gemlite": glk.version(), "producers": [], "kernels": [],
                 "failures": [], "skipped": []}
    print(f"[selftest] {res['device'].get('card')} torch {torch.__version__} "
          f"triton {res['device'].get('triton')} gemlite {res['gemlite']}", flush=True)

    def left():
        return budget_s - (time.time() - t0)

    # -- fused activation quantizers: the (bits, mode) pairs the W4A4/W6A6/W8A8 engines use ----
    cases = [("a4", ActQuant(bits=4), InputMode("fake")), ("a4", ActQuant(bits=4), InputMode("codes", fp8=True)),
             ("a6", ActQuant(bits=6), InputMode("fake")), ("a6", ActQuant(bits=6), InputMode("codes", rowsum=True)),
             ("a8", ActQuant(bits=8), InputMode("fake")), ("a8", ActQuant(bits=8), InputMode("codes", rowsum=True))]
    for dtype in (torch.float16,) if dry_cpu else (torch.float16, torch.bfloat16):  # numpy: no bf16
        for rows in (1, prefill_rows):
            res_, delta = _rand(rows, hidden, 1, dtype, dev), _rand(rows, hidden, 2, dtype, dev)
            w = (torch.rand(hidden, device=dev) + 0.5).to(dtype)
            gu = _rand(rows, 2 * inter, 3, dtype, dev, scale=2.0)
            _, h_n = fused.add_rms_norm_q(res_, delta, w, 1e-5, None, fused.FLOAT_INPUT)
            h_s = fused.silu_mul_q(gu, None, fused.FLOAT_INPUT)
            ref_n = fused.rms_norm_torch(res_ + delta, w, 1e-5)
            ref_s = fused.silu_mul_torch(gu)
            for an, act, mode in (cases if dtype == torch.float16 else cases[:1]):
                for op, h, ref, prep in (
                        ("add_rms_norm", h_n, ref_n, lambda m, a=act: fused.add_rms_norm_q(res_, delta, w, 1e-5, a, m)[1]),
                        ("silu_mul", h_s, ref_s, lambda m, a=act: fused.silu_mul_q(gu, a, m)),
                        ("rows", ref_n, ref_n, lambda m, a=act: fused.rows_q(ref_n, a, m))):
                    name = f"{op} rows={rows} {an} {mode.kind}{'-fp8' if mode.fp8 else ''} {str(dtype)[6:]}"
                    try:
                        p = prep(mode)
                        c = fused.check_codes(h, p, act)
                        c["float_err"] = rel_err(h, ref)
                        c["us"] = _time_us(lambda: prep(mode))
                        ok = not c["non_tie"] and not c["scale_mismatch"] and not c.get("rowsum_mismatch") \
                            and c["float_err"] <= 1e-3
                    except Exception as exc:  # noqa: BLE001
                        c, ok = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}, False
                        traceback.print_exc()
                    c.update(name=name, ok=ok)
                    res["producers"].append(c)
                    if not ok:
                        res["failures"].append(name)
                    print(f"[selftest] {'ok  ' if ok else 'FAIL'} {name}: "
                          + (c.get("error") or f"mismatch {c['mismatches']}/{c['elements']} "
                             f"non-tie {c['non_tie']} float {c['float_err']:.1e} {c['us']:.1f}us"), flush=True)
    # the attention output, read through its transpose
    att = _rand(heads * prefill_rows, hidden // heads, 4, torch.float16, dev).reshape(
        1, heads, prefill_rows, hidden // heads)  # [B, H, T, D] as attention returns it
    view = att.transpose(1, 2)  # [B, T, H, D], not contiguous
    p = fused.rows_q(view, ActQuant(bits=4), InputMode("codes", fp8=True))
    c = fused.check_codes(view.reshape(prefill_rows, hidden), p, ActQuant(bits=4))
    c.update(name="rows transposed attention output a4 codes-fp8", ok=c["mismatches"] == 0)
    res["producers"].append(c)
    if not c["ok"]:
        res["failures"].append(c["name"])
    print(f"[selftest] {'ok  ' if c['ok'] else 'FAIL'} {c['name']}: mismatch {c['mismatches']}", flush=True)

    res["online"] = _online_hadamard(res, dev, (256, 768) if dry_cpu else (hidden, inter), prefill_rows, heads,
                                     dry_cpu)

    # -- matmul kernels ------------------------------------------------------------------------
    # most informative first (the budget may cut the tail): the FP8 paths, tinygemm, gemlite
    schemes = [("w4a4", 4, 4, None, False), ("w4a16-sym-g128", 4, None, 128, True), ("w4a16", 4, None, None, False),
               ("w8a8", 8, 8, None, False), ("w6a6", 6, 6, None, False)]
    for dtype in (torch.float16, torch.bfloat16):
        if dry_cpu and dtype == torch.bfloat16:
            continue  # numpy has no bf16: the interpreter cannot run it
        for sname, bits, abits, group, sym in schemes:
            if dtype == torch.bfloat16 and sname != "w4a16-sym-g128":
                continue
            for N, K in (shapes if dtype == torch.float16 else shapes[:1]):
                if left() < 5:
                    res["skipped"].append(f"{sname} {N}x{K} {dtype}")
                    continue
                g = torch.Generator(device="cpu").manual_seed(N + K)
                w = (torch.randn(N, K, generator=g) * 0.02).to(dev)
                codes, scale, zero = rtn_weight(w, bits, sym, group)
                act = ActQuant(bits=abits) if abits else None
                lq = LinearQuant(bits=bits, codes=codes, scale=scale, zero=zero, group_size=group, sym=sym, act=act)
                rl = RealLinear.from_quant(lq, None, device=dev, dtype=dtype, name=f"{N}x{K}")
                w64 = lq.dequantized().double()
                opt = ()  # opt-in kernels autotune many configurations: not in an 8-minute call
                for phase, rows in (("decode", 1), ("prefill", prefill_rows)):
                    x = _rand(rows, K, rows, dtype, dev)
                    xq = quantize_activation(x, act) if act else x
                    want = xq.double() @ w64.t()
                    inputs = {"fake": Prepared("fake", xq) if act else x, "float": x}
                    comp = rl.int_compute()
                    if comp:
                        inputs["codes"] = fused.rows_q(x, act, InputMode("codes", fp8=comp == "fp8", rowsum=rl.corr))
                    for name in rl.candidates(phase, dev, opt_in=opt, dtype=dtype):
                        if name == "simulated" or name.startswith("dequant"):
                            continue
                        k = KERNELS[name]
                        label = f"{sname} {str(dtype)[6:]} {N}x{K} {phase} rows={rows} {name}"
                        entry = {"name": label, "scheme": sname, "dtype": str(dtype)[6:], "shape": [N, K],
                                 "phase": phase, "rows": rows, "kernel": name}
                        try:
                            inp = inputs[k.input]
                            y = rl.run(name, inp)
                            entry["rel_err"] = rel_err(y, want)
                            entry["us"] = _time_us(lambda: rl.run(name, inp))
                            entry["ok"] = entry["rel_err"] <= TOL and y.dtype == dtype
                            for key in ("scaled_mm_out", "gemlite_configs", "tinygemm_exact"):
                                if key in rl.notes:
                                    entry[key] = rl.notes[key]
                        except Exception as exc:  # noqa: BLE001
                            entry.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
                        res["kernels"].append(entry)
                        if not entry["ok"]:
                            res["failures"].append(label)
                        print(f"[selftest] {'ok  ' if entry['ok'] else 'FAIL'} {label}: "
                              + (entry.get("error") or f"err {entry['rel_err']:.1e} {entry['us']:.1f}us"),
                              flush=True)
                    ref_w = torch.randn(N, K, device=dev, dtype=dtype)
                    res["kernels"].append({"name": f"ref cublas {str(dtype)[6:]} {N}x{K} rows={rows}",
                                           "kernel": "ref-cublas", "shape": [N, K], "rows": rows,
                                           "dtype": str(dtype)[6:],
                                           "us": _time_us(lambda: torch.nn.functional.linear(x, ref_w)), "ok": True})
                del rl, w, codes
                if not dry_cpu:
                    torch.cuda.empty_cache()
    res["seconds"] = time.time() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(f"[selftest] {len(res['failures'])} failed, {len(res['skipped'])} skipped for time, "
          f"{res['seconds']:.0f}s; details in {out}", flush=True)
    for f in res["failures"]:
        print(f"[selftest] FAILED: {f}")
    return 1 if res["failures"] else 0


def summary(records: Path) -> int:
    from harness.perf.detail import load_detail
    from harness.perf.table import leaderboard_frame, load_records, write_perf_table

    recs = load_records(records)
    if not recs:
        print(f"no perf records in {records}")
        return 1
    write_perf_table(records, records.parent / "leaderboard.md")
    df = leaderboard_frame(recs)
    cols = ["model", "batch", "method", "scheme", "dtype", "layouts for", "gate", "trained err", "trained tol",
            "decode ms/tok", "decode ×", "prefill ms", "prefill ×", "tok/s", "peak GiB", "peak / base", "status"]
    print(df[[c for c in cols if c in df.columns]].to_markdown(index=False, floatfmt=".3g"))
    print("\nPer-layer kernel choice at batch 1 (us per layer; ref-cublas = the float layer it replaces):")
    for r in recs:
        if r.get("batch_size") != 1 or not r.get("kernels"):
            continue
        r = load_detail(r, records.parent, missing_ok=True, note=lambda msg: print(f"  {msg}"))
        for s in r["kernels"].get("selection", []):
            c = s["candidates"]
            ch = c.get(s["chosen"], {})
            ref = c.get("ref-cublas", {})
            ratio = ref["ms"] / ch["ms"] if ch.get("ms") and ref.get("ms") else None
            print(f"  {r['model']} {r.get('variant') or r['method']} {r['scheme']} {r.get('dtype')} "
                  f"{r.get('objective', 'generate')} {s['phase']:7s} {tuple(s['shape'])}: "
                  f"{s['chosen']} [{s.get('layout')}] {ch.get('ms', float('nan')) * 1e3:.1f} vs cublas "
                  f"{ref.get('ms', float('nan')) * 1e3:.1f}" + (f" ({ratio:.2f}x)" if ratio else ""))
    bad = [r for r in recs if r["status"] != "ok"]
    for r in bad:
        print(f"  not ok: {r['model']} B={r.get('batch_size')} {r.get('variant') or r['method']} {r['scheme']} "
              f"{r.get('dtype')} {r.get('objective', 'generate')}: {r.get('error')}; "
              + "; ".join((r.get("gate") or {}).get("failed") or []))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("selftest")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--budget", type=float, default=80, help="seconds; checks not started by then are skipped")
    s.add_argument("--dry-cpu", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    m = sub.add_parser("summary")
    m.add_argument("records", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "selftest":
        return selftest(args.out, args.budget, args.dry_cpu)
    return summary(args.records)


if __name__ == "__main__":
    sys.exit(main())
