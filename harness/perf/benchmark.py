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

import gc
import json
import os
import pickle
import shlex
import sys
import tempfile
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
from . import isolate
from .arch import load_for_perf
from .engine import LlavaEngine, online_summary
from .measure import (allocated_before, allocated_bytes, copy_bandwidth, device_info, engine_parts,
                      idle_float_bytes, kernel_summary, peak_memory, time_generate, weight_bytes)
from .states import (DTYPE_NAMES, Case, StatePreparer, SuiteSettings, Workload, float_variant, make_workload,
                     perf_variants)
from .table import load_records, write_perf_record, write_perf_table

TRAINED_GATE_MODEL = "qvlm-tiny-llava"
# what each layer's one weight layout is chosen for: the whole workload (prefill once, new_tokens - 1
# decode steps), decode alone, or prefill alone (what a scheme can do in prefill; decode then runs the
# fastest kernel of that layout)
OBJECTIVES = ("generate", "decode", "prefill")
GATE_POLICIES = ("auto", "strict")
TRAINED_GATE = ("auto", "on", "off")
DTYPES = ("auto", "fp16", "bf16", "fp32", "fp64")
ISOLATE = ("auto", "on", "off")


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
    on CUDA only). ``leaderboard``: re-render ``out/leaderboard.md`` at the end. ``isolate``: run each
    variant (with all its batch sizes) in a fresh child process, so that a CUDA fault costs that
    variant only (``auto``: on CUDA devices; ``harness.perf.isolate``). ``wide_layouts``: let a layer
    take a weight layout wider than its codes' storage (FP8 copies of W4 codes); the rows say so.
    ``methods_from``: the suite (file or bundled name) whose rows these are (``--methods-from``): each
    state gets the suite's quantization settings, calibration set, range rule and seed
    (``states.SuiteSettings``), so its record has the row identity of the suite's accuracy rows.
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
    isolate: str = "auto"
    wide_layouts: bool = False
    methods_from: str | None = None

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
        need(self.isolate in ISOLATE, f"--isolate must be one of {', '.join(ISOLATE)}, got {self.isolate!r}")
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

    @property
    def layouts(self) -> str:
        """``storage`` (no layout wider than the codes' storage: the default) or ``wide``."""
        return "wide" if self.wide_layouts else "storage"

    def isolate_on(self) -> bool:
        return self.isolate == "on" or (self.isolate == "auto" and str(self.device).startswith("cuda"))

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


def release(device) -> None:
    """Free what the dropped references held: a garbage collection first (an engine, its layers or
    an exception's frames caught in a reference cycle live until one runs, and their device memory
    would count in the next variant's figures), then the allocator's cache."""
    gc.collect()
    try:
        _sync(device)
    except Exception:  # noqa: BLE001 - a faulted context fails every call; the fault is recorded already
        pass


CUDA_FATAL = ("illegal memory access", "CUDA error", "device-side assert", "unspecified launch failure",
              "misaligned address", "AcceleratorError")


def cuda_fatal(exc: BaseException) -> bool:
    """Whether ``exc`` is a CUDA fault that poisons the process's CUDA context: every later CUDA call
    of the process fails, so nothing more can be measured in it."""
    text = f"{type(exc).__name__}: {exc}"
    return any(k in text for k in CUDA_FATAL)


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

    def state(self) -> dict:
        """What a child process needs to share this budget (the clock is the machine's)."""
        return {"seconds": self.seconds, "shares": self.shares, "t0": self.t0, "t_ref": self.t_ref}

    @classmethod
    def restore(cls, state: dict) -> "Budget":
        b = cls(state["seconds"], state["shares"])
        b.t0, b.t_ref = state["t0"], state["t_ref"]
        return b

    def remaining(self) -> float | None:
        return None if self.seconds is None else self.seconds - (time.time() - self.t0)

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
        self.after_write = None  # called with each record once written (the isolated child's hook)

    def write(self, v: Case, B: int, **fields) -> dict:
        qd = v.qcfg.to_dict() if v.qcfg is not None else None
        variant = v.variant.label  # the accuracy suites' row label: the leaderboard joins on it
        if self.overrides and not v.is_reference:  # rows of another configuration must not replace these
            variant += " (" + ", ".join(f"{k}={val}" for k, val in sorted(self.overrides.items())) + ")"
        dtype = DTYPE_NAMES.get(v.dtype, str(v.dtype))
        rec = dict(self.common, method=v.method, variant=variant, reference=v.is_reference,
                   control=not v.is_reference and not v.variant.cls.quantizes,
                   method_options=v.variant.options, clip=v.variant.act_clip_search,
                   scheme=v.scheme, dtype=dtype, batch_size=B,
                   quant_config=qd, quantize_s=v.quantize_s, proof=v.proof, n=self.reps, latency=None,
                   memory=None, kernel=None, status="failed", error=v.error, gate=None,
                   state_key=v.state_key, act_ranges=v.state_meta.get("act_ranges"),
                   calibration=v.state_meta.get("calibration"),
                   config_hash=digest([v.state_key, self.common["model"], v.method, v.variant.options,
                                       v.variant.act_clip_search, qd or v.scheme, B, dtype, self.common["workload"],
                                       self.common["objective"]]
                                      # rows with wide layouts are another configuration (the default's
                                      # hash is the one it had before the layout rule)
                                      + (["wide layouts"] if self.common.get("layouts") == "wide" else [])))
        rec.update(fields)
        rec.pop("timestamp", None)
        out = write_perf_record(self.path, **rec)
        if self.after_write is not None:
            self.after_write(out)
        return out


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
                        sel = select_kernels(layers, plan=[(ph, rows[ph], 1.0)], dtype=tlm.dtype, reps=2,
                                             wide_layouts=self.cfg.wide_layouts)
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
                                    seed=cfg.seed, settings=SuiteSettings(cfg.methods_from))
        self.trained = TrainedGate(cfg, lm, self.states)
        self.float_e2e: dict = {}  # dtype -> the float engine's end-to-end error
        self.fault: str | None = None  # a CUDA fault that poisoned this process's context: nothing more runs

    def _record(self, v: Case, B: int, **fields) -> dict:
        return self.recorder.write(v, B, **fields)

    def run_variant(self, v: Case, budget: Budget, share: int) -> list[dict]:
        log, lm = self.log, self.lm
        recs = []
        if self.fault:
            return [self._record(v, B, error=self._fault_error()) for B in self.batches]
        if not budget.allow(share, True):
            return [self._record(v, B, error=f"not run: time budget of {budget.seconds:.0f}s spent")
                    for B in self.batches]
        release(self.device)  # nothing of the previous variant may count in this one's memory
        blocks = None
        try:
            state = self.states.prepare(v, lm, self.wl)
            blocks = self.states.blocks(lm.model, state, lm.dtype)
            v.float_params = {} if state is None else state.float_params
            del state  # the deployed layers and float_params hold what the engine needs
            _sync(self.device)
            log(f"[perf] {v.label}: state in {v.quantize_s or 0:.1f}s, "
                f"{v.proof.get('quantized_linears', 0)} linears, simulated reference done")
            cal = v.state_meta.get("calibration") or {}
            if cal.get("instead_of"):  # the suite's set could not be built: this row is not the suite's state
                log(f"[perf] {v.label}: calibration: random batches instead of the suite's "
                    f"{cal['instead_of'].get('task')} set ({cal.get('why')}); the row will not join the "
                    "suite's accuracy rows")
        except Exception as exc:  # noqa: BLE001 - one broken method must not stop the run
            v.error = _short_error(exc)
            log(f"[perf] {v.label}: FAILED before timing: {v.error}")
            traceback.print_exc()
            if cuda_fatal(exc):
                self.fault = f"{v.label}, before timing ({v.error[:200]})"
            return [self._record(v, B) for B in self.batches]
        for bi, B in enumerate(self.batches):
            if self.fault:
                recs.append(self._record(v, B, error=self._fault_error()))
                continue
            if not budget.allow(share, bi == 0):
                recs.append(self._record(v, B, error=f"not run: time budget of {budget.seconds:.0f}s spent"))
                continue
            recs.append(self._run_batch(v, blocks, B))
        del blocks
        v.float_params, v.ref = {}, None  # the Case outlives the variant (its records, the bf16 choice)
        release(self.device)
        return recs

    def _fault_error(self) -> str:
        return (f"not attempted: the CUDA context of this process was lost to a fault at {self.fault}; "
                "run with --isolate on (the default on CUDA) to give each variant a fresh process")

    def allocated_before(self, v: Case, blocks) -> int | None:
        """Device bytes allocated before ``v``'s engine is built, less what is known to be there (the
        float model, ``v``'s deployed layers and float parameters, the gate's references, the
        trained-gate model): what earlier variants or batch sizes left behind; None off CUDA."""
        if not str(self.device).startswith("cuda"):
            return None
        release(self.device)
        tlm = self.trained._trained_lm
        return allocated_before(allocated_bytes(self.device), self.lm.model, blocks, v.float_params, v.ref,
                                None if tlm is None else tlm.model)

    def _run_batch(self, v: Case, blocks, B: int) -> dict:
        log, lm, wl = self.log, self.lm, self.wl
        fields: dict = {}
        engine = None
        try:
            t_eval = time.time()
            before = self.allocated_before(v, blocks)
            if before is not None:
                log(f"[perf] B={B} {v.label}: {before / 2**30:.2f} GiB allocated before the engine is built, "
                    "beyond the float model, this variant's layers and the gate's references"
                    + (" (left over from earlier work)" if before > 2**28 else ""))
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
            sel = select_kernels(lin, plan=plan, dtype=lm.dtype, only=self.cfg.kernels,
                                 wide_layouts=self.cfg.wide_layouts, log=log)
            if B == self.batches[0]:
                v.selection = sel
            for m in lin:
                if isinstance(m, RealLinear):
                    m.finalize_storage()  # one weight layout per layer, as deployed
            _sync(self.device)
            # each online Hadamard width: the fused kernel or the eager path, timed (after the layers'
            # kernels, whose input modes it needs; before the capture)
            engine.choose_online(plan=plan)
            _sync(self.device)
            engine.capture()
            ks = kernel_summary(engine)
            fields["kernel"] = "; ".join(f"{p}={'+'.join(n)}" for p, n in ks.items())
            fields["kernels"] = {**ks, "selection": [s.__dict__ for s in sel], "fused_producers": engine.fused,
                                 "online_transforms": online_summary(engine.online_impl),
                                 "online_timings": engine.online_timings,
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
                mem["allocated_before_bytes"] = before
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
            if cuda_fatal(exc):
                self.fault = f"B={B} {v.label} ({fields['error'][:200]})"
        finally:
            if engine is not None:
                engine.release()
            engine = lin = sel = None  # noqa: F841 - dropped before the collection below
            if not self.fault:
                release(self.device)
        return self._record(v, B, **fields)


# ---------------------------------------------------------------------------- the run

def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class PerfSession:
    """One process's side of a run: the model on the device, the workload, the records' common
    fields, the recorder and the variant runner (``open_session``). The whole run in one process
    uses one; with isolation each child process opens its own, with the parent's ``run_id``."""

    cfg: PerfConfig
    lm: object
    wl: Workload
    common: dict
    recorder: PerfRecorder
    runner: VariantRunner
    load_s: float

    def to_dtype(self, dtype: torch.dtype) -> None:
        """Cast the float model (the bf16 pass: converted from the first dtype, as in one process)."""
        if self.lm.dtype != dtype:
            self.lm.model.to(dtype)
            self.lm.dtype = dtype
            _sync(self.cfg.device)


def open_session(model: str, cfg: PerfConfig, *, run_id: str, load_dtype: str, log=print,
                 command: str | None = None, extra_common: dict | None = None) -> PerfSession:
    """Load ``model`` in ``load_dtype`` on ``cfg.device`` (its load time measured) and set up the
    recording of rows under ``run_id``."""
    device, seed = cfg.device, cfg.seed
    cuda = str(device).startswith("cuda")
    torch.manual_seed(seed)
    info = device_info(device)
    bw = copy_bandwidth(device)
    log(f"[perf] {model} on {info.get('card')} (driver {info.get('driver')}, torch {info['torch']}); "
        f"copy bandwidth {bw and round(bw)} GB/s; run {run_id}")
    set_compile(cfg.compile and cuda)
    t0 = time.time()
    lm = load_for_perf(model, dtype=load_dtype, device=device, seed=seed)
    load_s = time.time() - t0
    log(f"[perf] model ready in {load_s:.1f}s")
    wl = make_workload(lm.model.config, text_tokens=cfg.text_tokens, new_tokens=cfg.new_tokens, seed=seed,
                       image_size=cfg.image_size)
    language_layers(lm.model)  # a model without a language decoder fails here, before any variant
    common = {"suite": cfg.suite, "model": model, "task": None, "metric": "perf", "value": None,
              "stderr": None, "n_empty": None, "n_unparsed": None, "device": info.get("card"),
              "card": info.get("card"), "driver": info.get("driver"), "torch": info["torch"],
              "copy_bandwidth_gbs": bw, "versions": info, "git": git_describe(), "seed": seed,
              "run_id": run_id, "workload": wl.describe(), "model_path": lm.path, "objective": cfg.objective,
              "layouts": cfg.layouts, "methods_from": cfg.methods_from,
              "command": command if command is not None else " ".join(shlex.quote(a) for a in sys.argv)}
    common.update(extra_common or {})
    recorder = PerfRecorder(cfg.out / "records.jsonl", common, overrides=cfg.overrides, reps=cfg.reps)
    runner = VariantRunner(cfg, lm, wl, recorder, log=log)
    return PerfSession(cfg, lm, wl, common, recorder, runner, load_s)


def run_pairs(cfg: PerfConfig) -> list[tuple]:
    """The run's (variant, scheme) pairs in order: the float baseline first, then methods x schemes."""
    variants = perf_variants(cfg.methods)
    return [(variants[0], float_variant()[1])] + [(v, s) for v in variants[1:] for s in cfg.schemes]


def run_perf(model: str, config: PerfConfig | None = None, *, log=print, **options) -> list[dict]:
    """Benchmark ``model`` (architecture name, folder or Hub id) as ``config`` says (``PerfConfig``;
    keyword ``options`` build one, or replace fields of ``config``); returns the records written.

    The results folder is opened as the accuracy runner's is (``resultsdir.open_results_dir``: one
    driver per folder, stale temporaries of killed runs removed).
    With isolation (``PerfConfig.isolate``) every variant runs in a child process of its own
    (``harness.perf.isolate``); else all run here."""
    if config is not None and not isinstance(config, PerfConfig):
        raise TypeError(f"run_perf(model, config): config must be a PerfConfig, got {type(config).__name__}; "
                        "pass methods, schemes, ... as keywords or in a PerfConfig")
    cfg = PerfConfig(**options) if config is None else replace(config, **options) if options else config
    from ..resultsdir import open_results_dir

    # checked, locked and tidied as the accuracy runner does: temporaries a killed perf run left
    # (records, perf-detail sidecars) are removed, an unreadable records file is set aside
    with open_results_dir(cfg.out):
        if cfg.isolate_on():
            return run_isolated(model, cfg, log=log)
        return _run_in_process(model, cfg, log=log)


def _run_in_process(model: str, cfg: PerfConfig, *, log=print) -> list[dict]:
    t_start = time.time()
    device = cfg.device
    cuda = str(device).startswith("cuda")
    auto = cfg.dtype == "auto"
    first_dtype = auto_dtype(device) if auto else cfg.dtype  # the project's one rule: fp16 on GPU, fp64 on CPU
    session = open_session(model, cfg, run_id=new_run_id(), load_dtype=first_dtype, log=log)
    lm, runner = session.lm, session.runner
    pairs = run_pairs(cfg)
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
        session.to_dtype(torch.bfloat16)
        for var, s in [pairs[0]] + wanted:  # the bf16 baseline first, with every batch size
            v = Case(var, s, torch.bfloat16)
            records += runner.run_variant(v, budget, share=0 if v.is_reference else budget.shares - 1)
    finish(cfg, records, log=log, t_start=t_start)
    return records


def finish(cfg: PerfConfig, records: list[dict], *, log=print, t_start: float) -> None:
    """List what the time budget skipped, write the table (``leaderboard``), log the run's time."""
    skipped = [(r["method"], r["scheme"], r["dtype"], r["batch_size"]) for r in records
               if str(r.get("error") or "").startswith("not run")]
    if skipped:
        log(f"[perf] not run (time budget {cfg.time_budget_s}s): {skipped}")
    if cfg.leaderboard:
        write_perf_table(cfg.out / "records.jsonl", cfg.out / "leaderboard.md")
    log(f"[perf] done in {time.time() - t_start:.0f}s")


# ---------------------------------------------------------------------------- isolation (harness.perf.isolate)

def run_child(spec_path: str) -> int:
    """Run one variant of a parent's run in this (fresh) process; records go to the run's file."""
    with open(spec_path, "rb") as f:
        spec: isolate.ChildSpec = pickle.load(f)
    names = {v: k for k, v in DTYPE_NAMES.items()}
    isolation = {"mode": "child", "child": spec.child, "pid": os.getpid()}
    session = open_session(spec.model, spec.cfg, run_id=spec.run_id, load_dtype=spec.load_dtype,
                           command=spec.command, extra_common={"isolation": isolation})
    isolation["load_s"] = round(session.load_s, 3)
    if spec.common_path:
        Path(spec.common_path).write_text(json.dumps(session.common, default=str))
    dtype = names[spec.dtype]
    session.to_dtype(dtype)
    runner = session.runner
    runner.float_e2e = {names[k]: v for k, v in spec.float_e2e.items()}
    runner.trained.float_trained = {names[k]: v for k, v in spec.float_trained.items()}
    isolate.inject(spec, "start")
    written = []

    def after(rec):
        written.append(rec)
        if len(written) == 1:
            isolate.inject(spec, "after-first")

    session.recorder.after_write = after
    runner.run_variant(Case(spec.variant, spec.scheme, dtype), Budget.restore(spec.budget), spec.share)
    return 0


COMMON_KEYS = ("suite", "model", "task", "metric", "value", "stderr", "n_empty", "n_unparsed", "device", "card",
               "driver", "torch", "copy_bandwidth_gbs", "versions", "git", "seed", "run_id", "workload",
               "model_path", "objective", "layouts", "methods_from", "command")


class IsolatedRun:
    """The parent of an isolated run: one child per variant, failures recorded, the baseline's
    gate figures handed to the variants after it."""

    def __init__(self, model: str, cfg, *, log=print):
        self.model, self.log = model, log
        self.cfg = replace(cfg, isolate="off", leaderboard=False)  # what each child runs
        self.parent_cfg = cfg
        self.run_id = new_run_id()
        self.path = Path(cfg.out) / "records.jsonl"
        self.command = " ".join(shlex.quote(a) for a in sys.argv)
        self.children = 0
        self.load_s: float | None = None  # the last child's model load time
        self.common: dict | None = None  # the records' common fields, from the first child that had them
        self.float_e2e: dict = {}
        self.float_trained: dict = {}

    # -- records ---------------------------------------------------------------------------------

    def _records_of(self, child: int) -> list[dict]:
        if not self.path.exists():
            return []
        return [r for r in load_records(self.path) if r.get("run_id") == self.run_id
                and (r.get("isolation") or {}).get("child") == child]

    def _fallback_common(self) -> dict:
        """Common fields when no child got as far as writing them (the first child died loading)."""
        info = device_info(self.cfg.device)  # initialises CUDA here: only when no child could say
        return {"suite": self.cfg.suite, "model": self.model, "task": None, "metric": "perf", "value": None,
                "stderr": None, "n_empty": None, "n_unparsed": None, "device": info.get("card"),
                "card": info.get("card"), "driver": info.get("driver"), "torch": info["torch"],
                "copy_bandwidth_gbs": None, "versions": info, "git": git_describe(), "seed": self.cfg.seed,
                "run_id": self.run_id, "workload": {}, "model_path": None, "objective": self.cfg.objective,
                "layouts": self.cfg.layouts, "methods_from": self.cfg.methods_from, "command": self.command}

    def _write_failed(self, case, batches, common: dict, errors: dict, isolation: dict) -> list[dict]:
        case.qcfg = SuiteSettings(self.cfg.methods_from).qcfg(case.scheme, self.cfg.overrides,
                                                               reference=case.is_reference)
        rec = PerfRecorder(self.path, dict(common, isolation=isolation), overrides=self.cfg.overrides,
                           reps=self.cfg.reps)
        return [rec.write(case, B, **errors[B]) for B in batches]

    # -- one child -------------------------------------------------------------------------------

    def run_variant(self, var, scheme: str, dtype: torch.dtype, load_dtype: str, share: int, budget,
                    tmp: Path) -> list[dict]:
        cfg, log = self.cfg, self.log
        case = Case(var, scheme, dtype)
        child = self.children
        self.children += 1
        remaining = budget.remaining()
        if not budget.allow(share, True) or (remaining is not None and self.load_s is not None
                                              and remaining < self.load_s):
            why = f"not run: time budget of {budget.seconds:.0f}s spent"
            if budget.allow(share, True):
                why += f" (a fresh process needs ~{self.load_s:.0f}s to load the model; {remaining:.0f}s left)"
            log(f"[perf] {case.label}: {why}")
            common = self.common or self._fallback_common()
            return self._write_failed(case, cfg.batches, common, {B: {"error": why} for B in cfg.batches},
                                      {"mode": "parent", "child": None})
        spec = isolate.ChildSpec(self.model, cfg, self.run_id, self.command, child, var, scheme,
                         DTYPE_NAMES[dtype], load_dtype, share, budget.state(),
                         float_e2e=dict(self.float_e2e), float_trained=dict(self.float_trained),
                         common_path=str(tmp / f"common-{child}.json"))
        spec_path = tmp / f"child-{child}.pkl"
        with open(spec_path, "wb") as f:
            pickle.dump(spec, f)
        timeout = None if remaining is None else max(remaining, 0.0) + isolate.CHILD_GRACE_S
        log(f"[perf] {case.label}: child process {child} (deadline "
            f"{'none' if timeout is None else f'{timeout:.0f}s'})")
        res = isolate.run_child_process([sys.executable, "-m", "harness.perf.command", "perf", "--child",
                                         str(spec_path)], timeout=timeout, log=log, env=isolate.child_env())
        common_file = Path(spec.common_path)
        child_common = None
        if common_file.exists():
            child_common = json.loads(common_file.read_text())
            self.common = self.common or {k: child_common.get(k) for k in COMMON_KEYS}
        load_s = ((child_common or {}).get("isolation") or {}).get("load_s")
        if load_s is not None:
            self.load_s = load_s
        recs = self._records_of(child)
        done = {r.get("batch_size") for r in recs}
        missing = [B for B in cfg.batches if B not in done]
        log(f"[perf] {case.label}: child process {child} {'exited' if res.ok else res.reason()} after "
            f"{res.wall_s:.0f}s (model load {'?' if load_s is None else f'{load_s:.1f}s'}); "
            f"{len(recs)} of {len(cfg.batches)} batch sizes recorded")
        if missing:
            isolation = {"mode": "child", "child": child, "pid": res.pid, "load_s": load_s,
                         "returncode": res.returncode, "timed_out": res.timed_out,
                         "stderr_tail": res.stderr_tail}
            if res.ok:
                errors = {B: {"error": f"child process of {case.label} exited 0 without recording batch {B}"}
                          for B in missing}
            else:
                errors = {B: {"error": isolate.failure_error(res, case.label, B)} for B in missing}
            for B in missing:
                log(f"[perf] B={B} {case.label}: FAILED: {errors[B]['error']}")
            recs += self._write_failed(case, missing, self.common or self._fallback_common(), errors, isolation)
        order = {B: i for i, B in enumerate(cfg.batches)}
        recs.sort(key=lambda r: order.get(r.get("batch_size"), len(order)))
        if case.is_reference:
            self._keep_baseline(recs, DTYPE_NAMES[dtype])
        return recs

    def _keep_baseline(self, recs: list[dict], dtype: str) -> None:
        """The float engine's gate figures the other variants' gates compare against (as in one
        process: the last batch size's end-to-end error; the trained-model record of the first)."""
        for r in recs:
            g = r.get("gate") or {}
            if g.get("e2e_rel_logit_err") is not None:
                self.float_e2e[dtype] = g["e2e_rel_logit_err"]
            exact = (g.get("trained") or {}).get("exact")
            if exact is not None and dtype not in self.float_trained:
                self.float_trained[dtype] = exact

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> list[dict]:
        cfg, log = self.parent_cfg, self.log
        t_start = time.time()
        cuda = str(cfg.device).startswith("cuda")
        auto = cfg.dtype == "auto"
        first = auto_dtype(cfg.device) if auto else cfg.dtype
        names = {v: k for k, v in DTYPE_NAMES.items()}
        pairs = run_pairs(cfg)
        budget = Budget(cfg.time_budget_s, len(pairs) + (1 if auto and cuda else 0))
        log(f"[perf] {self.model}: run {self.run_id}, {len(pairs)} variants, each in a child process "
            f"(--isolate {cfg.isolate})")
        records: list[dict] = []
        wanted = []
        with tempfile.TemporaryDirectory(prefix="qvlm-perf-isolate-") as tmp:
            for i, (var, s) in enumerate(pairs):
                recs = self.run_variant(var, s, names[first], first, i, budget, Path(tmp))
                records += recs
                if i == 0:
                    budget.reference_done()
                if auto and cuda and not var.reference and wants_bf16(isolate.selection_of(recs, self.path.parent, log)):
                    wanted.append((var, s))
            if wanted:
                log(f"[perf] bf16 pass (a kernel that needs bf16 wins there): {[(v.label, s) for v, s in wanted]}")
                for var, s in [pairs[0]] + wanted:  # the bf16 baseline first, with every batch size
                    share = 0 if var.reference else budget.shares - 1
                    records += self.run_variant(var, s, torch.bfloat16, first, share, budget, Path(tmp))
        finish(cfg, records, log=log, t_start=t_start)
        return records


def run_isolated(model: str, cfg, *, log=print) -> list[dict]:
    """``run_perf`` with every variant in a child process of its own (``harness.perf.isolate``)."""
    return IsolatedRun(model, cfg, log=log).run()

