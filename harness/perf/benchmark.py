"""``run_perf``: model x methods x schemes x batch sizes -> gated latency/memory records + table.

One variant at a time (one quantization state on the device at once): the float baseline first,
then each (method, scheme), the methods resolved as accuracy suites resolve them
(``cells.resolve_methods``: the same ``Variant``, options, labels; ``states``):

1. make the state on the accuracy path (``prepare.prepare_state``: options, ``Method.quantize``, the
   unchanged-model check, ``finalize_state`` with the activation-range rule; random calibration
   data where the row uses data), run the simulated model of that state on the gate sample (its
   greedy reference), build the deployed layers (``engine.state_blocks``: codes, quantizers,
   online transforms, float weights) and keep the state's ``float_params`` for the engine;
2. for each batch size: choose layouts and kernels for the workload (``select_kernels``), compile
   and capture the engine, gate it (``gate.check``: layerwise at this model's shapes, end to end,
   the fused quantizers against the simulated quantizer, and once per variant end to end on the
   bundled trained model with the same kernels), time it, measure memory, append the record.

The float model's decoder weights stay on the device throughout (re-quantizing needs them); the
memory figures leave out those not used by the engine being measured. With ``dtype="auto"``,
variants whose best kernel needs bf16 (tinygemm) run a second time in bf16 together with a bf16
float baseline, so every ratio is against the baseline of the same dtype and call.

The parts: ``PerfConfig`` (the run's settings, checked in one place), ``states.StatePreparer``
(step 1), ``VariantRunner`` (step 2), ``TrainedGate`` (the trained-model check of step 2),
``PerfRecorder`` (one record per variant and batch size through ``harness.records``) and
``Budget`` (the time limit, shared fairly).
"""

from __future__ import annotations

import shlex
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..cells import digest
from ..kernels.real import TINYGEMM, RealLinear, set_compile
from ..kernels.select import select_kernels
from ..models.layers import language_layers
from ..models.loading import auto_dtype
from ..records import git_describe
from . import gate as gate_mod
from .arch import load_for_perf
from .engine import LlavaEngine
from .measure import (copy_bandwidth, device_info, engine_parts, idle_float_bytes, kernel_summary, peak_memory,
                      time_generate, weight_bytes)
from .states import DTYPE_NAMES, Case, StatePreparer, Workload, float_variant, make_workload, perf_variants
from .table import write_perf_record, write_perf_table

TRAINED_GATE_MODEL = "qvlm-tiny-llava"
# what each layer's one weight layout is chosen for: the whole workload (prefill once, new_tokens - 1
# decode steps), decode alone, or prefill alone (what a scheme can do in prefill; decode then runs the
# fastest kernel of that layout)
OBJECTIVES = ("generate", "decode", "prefill")
GATE_POLICIES = ("auto", "strict")
TRAINED_GATE = ("auto", "on", "off")
DTYPES = ("auto", "fp16", "bf16", "fp32", "fp64")


# ---------------------------------------------------------------------------- the settings

@dataclass
class PerfConfig:
    """Everything ``run_perf`` does for one model, checked in one place (``check``): each error
    names the option (as ``qvlm-bench perf`` spells it) and how to fix it.

    ``dtype``: fp16 / bf16 / fp32 / fp64, or ``auto`` (fp16 on CUDA, plus a bf16 pass with its own
    baseline for variants whose best kernel needs bf16; fp64 on the CPU: ``models.loading.auto_dtype``).
    ``objective``: ``generate`` chooses each layer's layout by the time of the whole workload
    (prefill once, ``new_tokens - 1`` decode steps), ``decode`` by decode time alone, ``prefill`` by
    prefill alone. ``trained_gate``: also gate every variant on the bundled trained model (``auto``:
    on CUDA only). ``leaderboard``: re-render ``out/leaderboard.md`` at the end.
    """

    methods: list = field(default_factory=lambda: ["rtn"])
    schemes: list = field(default_factory=lambda: ["w4a16", "w8a8", "w4a4", "w6a6"])
    batches: list = field(default_factory=lambda: [1])
    out: str | Path = "results/perf"
    suite: str = "perf"
    new_tokens: int = 128
    text_tokens: int = 70
    image_size: int | None = None  # the picture's side where the family takes any size (None: its default)
    warmup: int = 5
    reps: int = 20
    gate: str = "auto"
    gate_tokens: int = 8
    compile: bool = True
    graphs: bool = True
    device: str = "cuda"
    dtype: str = "auto"
    seed: int = 0
    overrides: dict = field(default_factory=dict)
    time_budget_s: float | None = None
    kernels: list | None = None
    objective: str = "generate"
    trained_gate: str = "auto"
    leaderboard: bool = True

    def __post_init__(self):
        self.methods, self.schemes, self.batches = list(self.methods), list(self.schemes), list(self.batches)
        self.overrides = dict(self.overrides or {})
        self.out = Path(self.out)
        self.check()

    def check(self) -> None:
        """Raise ``ValueError`` naming the option and the fix for the first setting that can't run."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}, got "
             f"{self.objective!r} (--objective)")
        need(self.gate in GATE_POLICIES, f"--gate must be one of {', '.join(GATE_POLICIES)}, got {self.gate!r}")
        need(self.trained_gate in TRAINED_GATE, f"--trained-gate must be one of {', '.join(TRAINED_GATE)}, "
             f"got {self.trained_gate!r}")
        need(self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        need(bool(self.batches) and all(isinstance(b, int) and b >= 1 for b in self.batches),
             f"--batch needs one or more batch sizes of at least 1 (e.g. --batch 1,8), got {self.batches}")
        need(self.reps >= 1, f"--reps {self.reps}: at least one timed generate is needed (>= 20 for reported "
             "numbers)")
        need(self.warmup >= 0, f"--warmup {self.warmup} is negative: use 0 or more (>= 5 for reported numbers)")
        need(self.gate_tokens >= 1, f"--gate-tokens {self.gate_tokens}: the gate compares at least one "
             "greedy token; use 1 or more")
        need(self.text_tokens >= 1, f"--text-tokens {self.text_tokens}: the prompt needs at least one text "
             "token around the image")
        need(self.new_tokens >= self.gate_tokens,
             f"--new-tokens {self.new_tokens} is below --gate-tokens {self.gate_tokens}: the gate feeds "
             f"{self.gate_tokens} tokens through the engine's KV cache, which holds the prompt and "
             f"new_tokens; raise --new-tokens or lower --gate-tokens")
        need(self.image_size is None or self.image_size >= 1,
             f"--image-size {self.image_size}: give the picture's side in pixels, or leave it out")
        need(self.time_budget_s is None or self.time_budget_s > 0,
             f"--time-budget {self.time_budget_s}: give a positive number of seconds, or leave it out")

    @property
    def plan_runs(self) -> dict:
        """How often each phase runs per generate, as the layout choice weighs it (``objective``)."""
        return {"decode": max(1, self.new_tokens - 1) if self.objective != "prefill" else 0,
                "prefill": 0 if self.objective == "decode" else 1}

    def trained_gate_on(self) -> bool:
        return self.trained_gate == "on" or (self.trained_gate == "auto" and str(self.device).startswith("cuda"))


# ---------------------------------------------------------------------------- helpers

def _short_error(exc: BaseException) -> str:
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {msg[:400]}"


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def wants_bf16(selection: list) -> bool:
    """Whether a bf16-only kernel (tinygemm) would win some layer group on the workload objective,
    judged from an fp16 run's selection: its time there includes fp16<->bf16 casts, so the native
    bf16 time of the same kernel (``ref-torch-int4pack-bf16``) stands in for it in decode."""
    by_shape: dict = {}
    for rec in selection:
        by_shape.setdefault(tuple(rec.shape), []).append(rec)
    for recs in by_shape.values():
        if any(r.chosen == TINYGEMM for r in recs):
            return True
        if not all(TINYGEMM in r.candidates and "ms" in r.candidates[TINYGEMM] for r in recs):
            continue
        cost = 0.0
        for r in recs:
            t = r.candidates[TINYGEMM]["ms"]
            native = r.candidates.get("ref-torch-int4pack-bf16", {}).get("ms")
            if r.phase == "decode" and native:
                t = min(t, native)
            cost += (r.runs or 1.0) * t
        best = min((r.layout_costs or {}).values(), default=None)
        if best is not None and cost < 0.98 * best:
            return True
    return False


class Budget:
    """Seconds for one model, shared fairly. The float baseline (share 0) runs every batch size
    while time is left (its rows are the other rows' denominators); after it, variant ``share``
    starts its first batch while time is left and its later batches only within the first
    ``share / (shares - 1)`` of the remaining time, so that every variant gets its batch-1 row."""

    def __init__(self, seconds: float | None, shares: int):
        self.seconds, self.shares, self.t0 = seconds, max(2, shares), time.time()
        self.t_ref: float | None = None  # seconds spent when the baseline finished

    def reference_done(self) -> None:
        if self.t_ref is None:
            self.t_ref = time.time() - self.t0

    def allow(self, share: int, first_batch: bool) -> bool:
        if self.seconds is None:
            return True
        elapsed = time.time() - self.t0
        if elapsed > self.seconds:
            return False
        if first_batch or share == 0:
            return True
        t_ref = self.t_ref or 0.0
        return elapsed < t_ref + (self.seconds - t_ref) * share / (self.shares - 1)


# ---------------------------------------------------------------------------- recording

class PerfRecorder:
    """One record per (variant, batch size) through the project's one records writer: the run's
    common fields, the row's label (the accuracy suites' row label, plus any overrides) and its
    ``config_hash`` (``cells.digest`` of the state key and what else determines the measurement)."""

    def __init__(self, path: Path, common: dict, *, overrides: dict, reps: int):
        self.path, self.common, self.overrides, self.reps = path, common, overrides, reps

    def write(self, v: Case, B: int, **fields) -> dict:
        qd = v.qcfg.to_dict() if v.qcfg is not None else None
        variant = v.variant.label  # the accuracy suites' row label: the leaderboard joins on it
        if self.overrides and not v.is_reference:  # rows of another configuration must not replace these
            variant += " (" + ", ".join(f"{k}={val}" for k, val in sorted(self.overrides.items())) + ")"
        dtype = DTYPE_NAMES.get(v.dtype, str(v.dtype))
        rec = dict(self.common, method=v.method, variant=variant, reference=v.is_reference,
                   control=not v.is_reference and not v.variant.cls.quantizes,
                   method_options=v.variant.options, clip=v.variant.clip,
                   scheme=v.scheme, dtype=dtype, batch_size=B,
                   quant_config=qd, quantize_s=v.quantize_s, proof=v.proof, n=self.reps, latency=None,
                   memory=None, kernel=None, status="failed", error=v.error, gate=None,
                   state_key=v.state_key, act_ranges=v.state_meta.get("act_ranges"),
                   calibration=v.state_meta.get("calibration"),
                   config_hash=digest([v.state_key, self.common["model"], v.method, v.variant.options,
                                       v.variant.clip, qd or v.scheme, B, dtype, self.common["workload"],
                                       self.common["objective"]]))
        rec.update(fields)
        rec.pop("timestamp", None)
        return write_perf_record(self.path, **rec)


# ---------------------------------------------------------------------------- the trained-model gate

class TrainedGate:
    """The variant's state on the bundled trained model, run with the kernels the benchmarked
    model chose, against float64 (policy ``exact``); holds that model and the float engine's result."""

    def __init__(self, cfg: PerfConfig, lm, states: StatePreparer):
        self.cfg, self.lm, self.states = cfg, lm, states
        self.device = cfg.device
        self._trained_lm = None
        self.float_trained: dict = {}  # dtype -> the float engine's trained-model exact record

    def __call__(self, v: Case, big: LlavaEngine) -> dict:
        """End to end on the bundled trained model, with the kernels ``big`` chose (by layer role and
        phase) wherever they take its shapes: on random weights, one-step code flips at rounding
        ties are amplified through 32-40 layers and hide kernel bugs; a trained model is not."""
        from ..models.loading import bundled_models, load_model

        if TRAINED_GATE_MODEL not in bundled_models():
            return {"ran": False, "reason": f"bundled model {TRAINED_GATE_MODEL} not found"}
        out: dict = {"ran": True, "model": TRAINED_GATE_MODEL}
        engine = None
        try:
            if self._trained_lm is None or self._trained_lm.dtype != self.lm.dtype:
                self._trained_lm = load_model(TRAINED_GATE_MODEL, dtype=self.lm.dtype, device=self.device)
            tlm = self._trained_lm
            tv = Case(v.variant, v.scheme, tlm.dtype)
            wl = make_workload(tlm.model.config, text_tokens=24, new_tokens=self.cfg.gate_tokens + 1, seed=1)
            state = self.states.prepare(tv, tlm, wl, exact=True)  # the same method and options, this model
            blocks = self.states.blocks(tlm.model, state, tlm.dtype)
            fp = {} if state is None else state.float_params
            del state
            engine = LlavaEngine(tlm.model, blocks, compile=False, graphs=False,  # the kernels are the subject
                                 float_params=fp)
            ids, pix = wl.batch(1)
            engine.setup(ids, pix, wl.new_tokens)
            roles = {}
            for key, m in zip(("qkv", "o", "gate_up", "down"), (big.blocks[0].qkv, big.blocks[0].o,
                                                               big.blocks[0].gate_up, big.blocks[0].down)):
                roles[key] = dict(getattr(m, "choice", {}))
            forced, fallback = {}, []
            lin = []
            for blk in engine.blocks:
                for key in ("qkv", "o", "gate_up", "down"):
                    m = getattr(blk, key)
                    for p in (m.parts if hasattr(m, "parts") else [m]):
                        if not isinstance(p, RealLinear):
                            continue
                        p.act_dtype = tlm.dtype
                        for ph in ("decode", "prefill"):
                            want = roles[key].get(ph)
                            if want and want in p.candidates(ph, self.device, opt_in=self.cfg.kernels or (),
                                                             dtype=tlm.dtype):
                                p.choice[ph] = want
                                forced[f"{key}.{ph}"] = want
                            else:
                                lin.append((p, ph))
            if lin:  # the big model's kernel does not take these shapes: select among the others
                rows = {"decode": 1, "prefill": int(ids.shape[1])}
                for ph in ("decode", "prefill"):
                    layers = [p for p, q in lin if q == ph]
                    if layers:
                        sel = select_kernels(layers, plan=[(ph, rows[ph], 1.0)], dtype=tlm.dtype, reps=2)
                        fallback += [f"{ph} {tuple(s.shape)} -> {s.chosen}" for s in sel]
            for p in engine_parts(engine):
                if isinstance(p, RealLinear):
                    p.finalize_storage()
            engine.capture(warmup=1)
            g = gate_mod.check(engine, tv.ref, act_quant=False, policy="exact",
                               float_exact=None if v.is_reference else self.float_trained.get(tlm.dtype))
            if v.is_reference and g["exact"] is not None:
                self.float_trained[tlm.dtype] = g["exact"]
            out.update(passed=bool(g["passed"]), e2e_rel_logit_err=g["e2e_rel_logit_err"], e2e_tol=g["e2e_tol"],
                       e2e_tokens_match=g["e2e_tokens_match"], layerwise_max_rel_err=g["layerwise_max_rel_err"],
                       layerwise=g["layerwise"], layerwise_rounding_ties=g["layerwise_rounding_ties"],
                       exact=g["exact"], tokens_sim=g["tokens_sim"], tokens_real=g["tokens_real"],
                       kernels=forced, not_accepted=fallback, fused_producers=engine.fused)
            if engine.fused:
                pc = gate_mod.check_producers(engine, tv.ref)
                out["producers"] = pc
                out["passed"] = bool(out["passed"] and pc["passed"])
        except Exception as exc:  # noqa: BLE001 - recorded; the variant fails its gate
            out.update(passed=False, error=_short_error(exc))
            traceback.print_exc()
        finally:
            if engine is not None:
                engine.release()
            _sync(self.device)
        return out


# ---------------------------------------------------------------------------- one variant

class VariantRunner:
    """Runs one variant at every batch size: its state (``StatePreparer``), then per batch size the
    kernel choice, the engine's capture, the gate, the timing and the memory, each written as a
    record (``PerfRecorder``)."""

    def __init__(self, cfg: PerfConfig, lm, wl: Workload, recorder: PerfRecorder, log=print):
        self.cfg, self.lm, self.wl, self.recorder, self.log = cfg, lm, wl, recorder, log
        self.device = cfg.device
        self.batches = cfg.batches
        self.plan_runs = cfg.plan_runs
        self.states = StatePreparer(device=cfg.device, gate_tokens=cfg.gate_tokens, overrides=cfg.overrides,
                                    seed=cfg.seed)
        self.trained = TrainedGate(cfg, lm, self.states)
        self.float_e2e: dict = {}  # dtype -> the float engine's end-to-end error

    def _record(self, v: Case, B: int, **fields) -> dict:
        return self.recorder.write(v, B, **fields)

    def run_variant(self, v: Case, budget: Budget, share: int) -> list[dict]:
        log, lm = self.log, self.lm
        recs = []
        if not budget.allow(share, True):
            return [self._record(v, B, error=f"not run: time budget of {budget.seconds:.0f}s spent")
                    for B in self.batches]
        blocks = None
        try:
            state = self.states.prepare(v, lm, self.wl)
            blocks = self.states.blocks(lm.model, state, lm.dtype)
            v.float_params = {} if state is None else state.float_params
            del state  # the deployed layers and float_params hold what the engine needs
            _sync(self.device)
            log(f"[perf] {v.label}: state in {v.quantize_s or 0:.1f}s, "
                f"{v.proof.get('quantized_linears', 0)} linears, simulated reference done")
        except Exception as exc:  # noqa: BLE001 - one broken method must not stop the run
            v.error = _short_error(exc)
            log(f"[perf] {v.label}: FAILED before timing: {v.error}")
            traceback.print_exc()
            return [self._record(v, B) for B in self.batches]
        for bi, B in enumerate(self.batches):
            if not budget.allow(share, bi == 0):
                recs.append(self._record(v, B, error=f"not run: time budget of {budget.seconds:.0f}s spent"))
                continue
            recs.append(self._run_batch(v, blocks, B))
        del blocks
        _sync(self.device)
        return recs

    def _run_batch(self, v: Case, blocks, B: int) -> dict:
        log, lm, wl = self.log, self.lm, self.wl
        fields: dict = {}
        engine = None
        try:
            t_eval = time.time()
            engine = LlavaEngine(lm.model, blocks, compile=self.cfg.compile, graphs=self.cfg.graphs,
                                 float_params=v.float_params)
            ids, pix = wl.batch(B)
            engine.setup(ids, pix, self.cfg.new_tokens)
            lin = engine_parts(engine)
            for m in lin:
                if isinstance(m, RealLinear):
                    m.choice.clear()
                    m.restore_ours()
            T = wl.input_ids.shape[1]
            plan = [("decode", B, float(self.plan_runs["decode"])), ("prefill", B * T, float(self.plan_runs["prefill"]))]
            sel = select_kernels(lin, plan=plan, dtype=lm.dtype, only=self.cfg.kernels, log=log)
            if B == self.batches[0]:
                v.selection = sel
            for m in lin:
                if isinstance(m, RealLinear):
                    m.finalize_storage()  # one weight layout per layer, as deployed
            _sync(self.device)
            engine.capture()
            ks = kernel_summary(engine)
            fields["kernel"] = "; ".join(f"{p}={'+'.join(n)}" for p, n in ks.items())
            fields["kernels"] = {**ks, "selection": [s.__dict__ for s in sel], "fused_producers": engine.fused,
                                 "compiled_glue": engine.compiled,
                                 "cuda_graphs": sorted(engine.graphs) if engine.use_graphs else [],
                                 "graph_notes": engine.graph_notes,
                                 "layer_notes": sorted({f"{k}: {n}" for m in lin if isinstance(m, RealLinear)
                                                        for k, n in m.notes.items()})}
            g = gate_mod.check(engine, v.ref, act_quant=v.act_quant, policy=self.cfg.gate,
                               float_e2e=self.float_e2e.get(v.dtype) if not v.is_reference else None)
            if engine.fused:
                g["producers"] = gate_mod.check_producers(engine, v.ref)
                g["passed"] = bool(g["passed"] and g["producers"]["passed"])
            if v.is_reference and g.get("e2e_rel_logit_err") is not None:
                self.float_e2e[v.dtype] = g["e2e_rel_logit_err"]
            if self.cfg.trained_gate_on() and v.trained is None:
                v.trained = self.trained(v, engine)
            if v.trained is not None:
                g["trained"] = v.trained
                if v.trained.get("ran"):
                    g["passed"] = gate_mod.combine(g, v.trained)
            fields["gate"] = g
            simulated = any("simulated" in n for n in ks["prefill"] + ks["decode"])
            tr = v.trained or {}
            log(f"[perf] B={B} {v.label}: gate {'PASS' if g['passed'] else 'FAIL'} "
                f"(layerwise {g['layerwise_max_rel_err']:.2e}, e2e {g['e2e_rel_logit_err']:.2e} "
                f"tol {g['e2e_tol']:.1e}, tokens {'same' if g['e2e_tokens_match'] else 'DIFFER'}"
                + (f", producers {'ok' if g['producers']['passed'] else 'FAIL'}" if "producers" in g else "")
                + (f", trained vs float64 {(tr.get('exact') or {}).get('rel_logit_err', float('nan')):.2e} "
                   f"(eager {(tr.get('exact') or {}).get('sim_rel_logit_err', float('nan')):.1e}) "
                   f"{'PASS' if tr.get('passed') else 'FAIL'}" if tr.get("ran") else "")
                + f") kernels {fields['kernel']}")
            g["failed"] = gate_mod.failed_checks(g)
            if g["failed"]:
                log(f"[perf] B={B} {v.label}: failed checks: " + "; ".join(g["failed"]))
            if not g["passed"]:
                fields["error"] = "correctness gate failed: not timed"
            elif simulated:
                fields.update(kernel="simulated", status="ok",
                              error="no real kernel for this scheme here: not timed (simulated)")
            else:
                lat = time_generate(engine, warmup=self.cfg.warmup, reps=self.cfg.reps)
                mem = peak_memory(engine, exclude_bytes=idle_float_bytes(lm.model, engine))
                mem.update(weight_bytes(engine))
                mem["kv_cache_bytes"] = int(sum(k.numel() * k.element_size() * 2 for k in engine.k_cache))
                fields.update(latency=lat, memory=mem, status="ok", error=None)
                peak = mem["peak_bytes"] / 2**30 if mem.get("peak_bytes") else float("nan")
                log(f"[perf] B={B} {v.label}: ttft {lat['ttft_ms']:.2f} ms, prefill {lat['prefill_ms']:.2f} ms, "
                    f"decode {lat['decode_ms_per_token']:.3f} ms/tok (IQR {lat['iqr']['decode_ms_per_token']:.3f}), "
                    f"peak {peak:.2f} GiB")
            fields["eval_s"] = time.time() - t_eval
        except Exception as exc:  # noqa: BLE001
            fields["error"] = _short_error(exc)
            log(f"[perf] B={B} {v.label}: FAILED: {fields['error']}")
            traceback.print_exc()
        finally:
            if engine is not None:
                engine.release()
            engine = None
            _sync(self.device)
        return self._record(v, B, **fields)


# ---------------------------------------------------------------------------- the run

def run_perf(model: str, config: PerfConfig | None = None, *, log=print, **options) -> list[dict]:
    """Benchmark ``model`` (architecture name, folder or Hub id) as ``config`` says (``PerfConfig``;
    keyword ``options`` build one, or replace fields of ``config``); returns the records written."""
    if config is not None and not isinstance(config, PerfConfig):
        raise TypeError(f"run_perf(model, config): config must be a PerfConfig, got {type(config).__name__}; "
                        "pass methods, schemes, ... as keywords or in a PerfConfig")
    cfg = PerfConfig(**options) if config is None else replace(config, **options) if options else config
    t_start = time.time()
    out = cfg.out
    run_id = uuid.uuid4().hex[:12]
    device, seed = cfg.device, cfg.seed
    cuda = str(device).startswith("cuda")
    auto = cfg.dtype == "auto"
    first_dtype = auto_dtype(device) if auto else cfg.dtype  # the project's one rule: fp16 on GPU, fp64 on CPU
    torch.manual_seed(seed)
    info = device_info(device)
    bw = copy_bandwidth(device)
    log(f"[perf] {model} on {info.get('card')} (driver {info.get('driver')}, torch {info['torch']}); "
        f"copy bandwidth {bw and round(bw)} GB/s; run {run_id}")
    set_compile(cfg.compile and cuda)

    t0 = time.time()
    lm = load_for_perf(model, dtype=first_dtype, device=device, seed=seed)
    log(f"[perf] model ready in {time.time() - t0:.1f}s")
    wl = make_workload(lm.model.config, text_tokens=cfg.text_tokens, new_tokens=cfg.new_tokens, seed=seed,
                       image_size=cfg.image_size)
    language_layers(lm.model)  # a model without a language decoder fails here, before any variant

    common = {"suite": cfg.suite, "model": model, "task": None, "metric": "perf", "value": None,
              "stderr": None, "n_empty": None, "n_unparsed": None, "device": info.get("card"),
              "card": info.get("card"), "driver": info.get("driver"), "torch": info["torch"],
              "copy_bandwidth_gbs": bw, "versions": info, "git": git_describe(), "seed": seed,
              "run_id": run_id, "workload": wl.describe(), "model_path": lm.path, "objective": cfg.objective,
              "command": " ".join(shlex.quote(a) for a in sys.argv)}
    recorder = PerfRecorder(out / "records.jsonl", common, overrides=cfg.overrides, reps=cfg.reps)
    runner = VariantRunner(cfg, lm, wl, recorder, log=log)
    variants = perf_variants(cfg.methods)
    reference = variants[0]
    pairs = [(reference, float_variant()[1])] + [(v, s) for v in variants[1:] for s in cfg.schemes]
    budget = Budget(cfg.time_budget_s, len(pairs) + (1 if auto and cuda else 0))
    records: list[dict] = []
    wanted = []
    for i, (var, s) in enumerate(pairs):
        v = Case(var, s, lm.dtype)
        records += runner.run_variant(v, budget, share=i)
        if i == 0:
            budget.reference_done()
        if auto and cuda and not v.is_reference and wants_bf16(v.selection):
            wanted.append((var, s))
    if wanted:
        log(f"[perf] bf16 pass (a kernel that needs bf16 wins there): {[(v.label, s) for v, s in wanted]}")
        lm.model.to(torch.bfloat16)
        lm.dtype = torch.bfloat16
        _sync(device)
        for var, s in [pairs[0]] + wanted:  # the bf16 baseline first, with every batch size
            v = Case(var, s, torch.bfloat16)
            records += runner.run_variant(v, budget, share=0 if v.is_reference else budget.shares - 1)
    skipped = [(r["method"], r["scheme"], r["dtype"], r["batch_size"]) for r in records
               if str(r.get("error") or "").startswith("not run")]
    if skipped:
        log(f"[perf] not run (time budget {cfg.time_budget_s}s): {skipped}")
    if cfg.leaderboard:
        write_perf_table(out / "records.jsonl", out / "leaderboard.md")
    log(f"[perf] done in {time.time() - t_start:.0f}s")
    return records

