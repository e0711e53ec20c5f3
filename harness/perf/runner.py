"""``run_perf``: model x methods x schemes x batch sizes -> gated latency/memory records + table.

One variant at a time (one quantization state on the device at once): the float baseline first,
then each (method, scheme), the methods resolved as accuracy suites resolve them
(``cells.resolve_methods``: the same ``Variant``, options, labels):

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
"""

from __future__ import annotations

import copy
import shlex
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cells import Variant, act_range_rule, digest, resolve_methods, state_identity, uses_calibration
from ..suite_config import MethodSpec, method_spec
from ..models.layers import language_layers
from ..models.loading import auto_dtype
from ..prepare import prepare_state
from ..quant.config import parse_scheme
from ..quant.simulated import apply_state
from ..records import git_describe
from . import gate as gate_mod
from .arch import load_for_perf
from .engine import LlavaEngine, state_blocks
from .measure import copy_bandwidth, device_info, peak_memory, time_generate
from .real import TINYGEMM, RealLinear, select_kernels, set_compile
from .records import write_perf_record, write_perf_table

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
TRAINED_GATE_MODEL = "qvlm-tiny-llava"
# what each layer's one weight layout is chosen for: the whole workload (prefill once, new_tokens - 1
# decode steps), decode alone, or prefill alone (what a scheme can do in prefill; decode then runs the
# fastest kernel of that layout)
OBJECTIVES = ("generate", "decode", "prefill")


def float_variant() -> tuple[str, str]:
    """The baseline row: the method that declares itself the reference, unquantized."""
    from ..registry import reference_method

    return reference_method(), "w16a16"


def perf_variants(methods) -> list[Variant]:
    """``methods`` (names, ``MethodSpec``s, suite ``methods`` entries, or ``cells.Variant``s resolved
    with their suite) as ``cells.Variant``s, the float reference first (once); the same resolution,
    options and labels as accuracy suites."""
    methods = list(methods)
    ref_name, _ = float_variant()
    if methods and all(isinstance(m, Variant) for m in methods):  # resolved already (with a suite)
        variants = methods
        if not any(v.reference for v in variants):
            variants = resolve_methods([MethodSpec(ref_name)]) + variants
        return sorted(variants, key=lambda v: not v.reference)
    specs = [method_spec(m) for m in methods]
    if ref_name not in [s.name for s in specs]:
        specs = [MethodSpec(ref_name)] + specs
    variants = resolve_methods(specs)
    return sorted(variants, key=lambda v: not v.reference)


# ---------------------------------------------------------------------------- workload

@dataclass
class Workload:
    input_ids: torch.Tensor  # [1, L]
    pixel_values: torch.Tensor  # [1, 3, S, S]
    image_tokens: int
    text_tokens: int
    new_tokens: int

    def batch(self, B: int):
        return self.input_ids.repeat(B, 1), self.pixel_values.repeat(B, 1, 1, 1)

    def describe(self) -> dict:
        return {"image_tokens": self.image_tokens, "text_tokens": self.text_tokens,
                "prompt_tokens": int(self.input_ids.shape[1]), "new_tokens": self.new_tokens,
                "image_size": int(self.pixel_values.shape[-1]), "eos": "ignored (forced length)",
                "inputs": "random token ids + one random normalised image (systems benchmark)"}


def make_workload(config, *, text_tokens: int = 70, new_tokens: int = 128, seed: int = 0) -> Workload:
    """One image (576 tokens at 336 px / patch 14) inside ~``text_tokens`` random text tokens."""
    vc = config.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2
    if getattr(config, "vision_feature_select_strategy", "default") == "full":
        n_img += 1
    image_token = getattr(config, "image_token_id", None)
    if image_token is None:
        image_token = config.image_token_index
    vocab = config.text_config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    hi = min(vocab, 32000)
    text = torch.randint(3, hi, (text_tokens,), generator=gen)
    text[text == image_token] = 3
    bos = getattr(config.text_config, "bos_token_id", 1) or 1
    head = 5  # "<s> USER :" before the image, the question and " ASSISTANT:" after it
    ids = torch.cat([torch.tensor([bos]), text[: head - 1], torch.full((n_img,), image_token),
                     text[head - 1:]])
    pix = torch.randn(1, 3, vc.image_size, vc.image_size, generator=gen)
    return Workload(ids[None], pix, n_img, text_tokens + 1, new_tokens)


# ---------------------------------------------------------------------------- methods & states

def random_calibration(lm, workload: Workload, n: int = 4):
    """Random calibration batches for methods that need data (systems benchmarking only)."""
    from ..calibration import CalibrationSet

    cfg = lm.model.config
    image_token = getattr(cfg, "image_token_id", None)
    image_token = cfg.image_token_index if image_token is None else image_token
    vocab = min(cfg.text_config.vocab_size, 32000)
    ids, pix = workload.batch(1)
    gen = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(n):
        b_ids = ids.clone()
        txt = b_ids != image_token
        txt[:, 0] = False  # keep BOS
        b_ids[txt] = torch.randint(3, vocab, (int(txt.sum()),), generator=gen)
        b_ids[txt & (b_ids == image_token)] = 3
        labels = torch.full_like(b_ids, -100)
        labels[:, -8:] = b_ids[:, -8:]
        batches.append({"input_ids": b_ids.to(lm.device),
                        "attention_mask": torch.ones_like(b_ids).to(lm.device),
                        "pixel_values": torch.randn(pix.shape, generator=gen).to(lm.device, lm.dtype),
                        "labels": labels.to(lm.device)})
    return CalibrationSet(batches=batches, source={"kind": "random", "n": n,
                                                   "note": "random tokens and images: systems benchmark"})


def perf_state(lm, variant: Variant, qcfg, workload: Workload, *, seed: int = 0):
    """``(state, state_key)``: the state a perf row times, made by the accuracy worker's path
    (``prepare.prepare_state``: the variant's options, the unchanged-model check, ``finalize_state``
    with the suites' activation-range rule), on random calibration data where the row uses data
    (``cells.uses_calibration``), and its ``cells.state_identity`` digest."""
    calib = random_calibration(lm, workload) if uses_calibration(variant.cls, variant.act_clip_search, qcfg) else None
    rule = act_range_rule(None, variant, qcfg)
    state = prepare_state(lm, variant, qcfg, calib, rule, seed=seed)
    dtype = DTYPE_NAMES.get(lm.dtype, str(lm.dtype))
    device_kind = "cuda" if str(lm.device).startswith("cuda") else str(lm.device)
    ident = state_identity(lm.name, f"{lm.path}; seed {seed}", dtype, device_kind, variant, qcfg,
                           None if calib is None else {**calib.source, "digest": calib.digest()}, rule, seed)
    return state, digest(ident)


# ---------------------------------------------------------------------------- helpers

def _bytes_of(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t is None or t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def weight_bytes(engine: LlavaEngine) -> dict:
    lang_lin = sum(m.weight_bytes() if isinstance(m, RealLinear) else _bytes_of(m)
                   for m in engine.linears().values())
    seen, other = set(), 0
    for t in engine.float_tensors().values():  # embeddings, LM head (tied: once), norms
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            other += t.numel() * t.element_size()
    vision = sum(_bytes_of(m) for m in engine.vision_modules())
    return {"weight_bytes_language": int(lang_lin + other), "weight_bytes_language_linears": int(lang_lin),
            "weight_bytes_vision": int(vision)}


def idle_float_bytes(model, engine: LlavaEngine) -> int:
    """Bytes of the float model's tensors on the device that ``engine`` does not use (decoder
    weights the engine holds quantized, and whatever the state replaced: norms, embeddings, a vision
    tower): held only to quantize later variants, so left out of the engine's memory figures."""
    used = engine.tensors_in_use()
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "cpu" or t.data_ptr() in used or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def kernel_summary(engine: LlavaEngine) -> dict:
    out = {}
    for phase in ("prefill", "decode"):
        names = []
        for m in engine.linears().values():
            parts = m.parts if hasattr(m, "parts") else [m]
            for p in parts:
                lab = p.kernel_label(phase)
                if lab not in names:
                    names.append(lab)
        out[phase] = names
    return out


def _short_error(exc: BaseException) -> str:
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {msg[:400]}"


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _parts(engine: LlavaEngine) -> list:
    out = []
    for m in engine.linears().values():
        out.extend(m.parts if hasattr(m, "parts") else [m])
    return out


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


@dataclass
class Case:
    """One (variant, scheme, dtype) of a perf run, and what the run found for it. ``variant`` is
    the accuracy suites' ``cells.Variant`` (method class, resolved options, row label)."""

    variant: Variant
    scheme: str
    dtype: torch.dtype
    qcfg: object = None
    ref: gate_mod.SimReference | None = None
    quantize_s: float | None = None
    error: str | None = None
    proof: dict = field(default_factory=dict)
    trained: dict | None = None  # the trained-model gate, once per variant
    selection: list = field(default_factory=list)
    float_params: dict = field(default_factory=dict)  # the state's, for the engine
    state_key: str | None = None  # cells.state_identity's digest
    state_meta: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.variant.method

    @property
    def is_reference(self) -> bool:
        return self.variant.reference

    @property
    def act_quant(self) -> bool:
        return self.qcfg is not None and self.qcfg.quantizes_acts

    @property
    def label(self) -> str:
        return f"{self.variant.label} {self.scheme} ({DTYPE_NAMES.get(self.dtype, self.dtype)})"


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


# ---------------------------------------------------------------------------- the run

def run_perf(model: str, methods=("rtn",), schemes=("w4a16", "w8a8", "w4a4", "w6a6"),
             batches=(1,), *, out: str | Path = "results/perf", suite: str = "perf",
             new_tokens: int = 128, text_tokens: int = 70, warmup: int = 5, reps: int = 20,
             gate: str = "auto", gate_tokens: int = 8, compile: bool = True, graphs: bool = True,
             device: str = "cuda", dtype: str = "auto", seed: int = 0, overrides: dict | None = None,
             time_budget_s: float | None = None, kernels: list[str] | None = None,
             objective: str = "generate", trained_gate: str = "auto", leaderboard: bool = True,
             log=print) -> list[dict]:
    """Benchmark ``model`` (architecture name, folder or Hub id); returns the records written.

    ``dtype``: fp16 / bf16 / fp32, or ``auto`` (fp16 on CUDA, plus a bf16 pass with its own
    baseline for variants whose best kernel needs bf16; fp64 on the CPU: ``models.loading.auto_dtype``). ``objective``:
    ``generate`` chooses each layer's layout by the time of the whole workload (prefill once,
    ``new_tokens - 1`` decode steps), ``decode`` by decode time alone, ``prefill`` by prefill alone.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if new_tokens < gate_tokens:
        raise ValueError(f"--new-tokens {new_tokens} is below --gate-tokens {gate_tokens}: the gate feeds "
                         f"{gate_tokens} tokens through the engine's KV cache, which holds the prompt and "
                         f"new_tokens; raise --new-tokens or lower --gate-tokens")
    t_start = time.time()
    overrides = dict(overrides or {})
    out = Path(out)
    run_id = uuid.uuid4().hex[:12]
    cuda = str(device).startswith("cuda")
    auto = dtype == "auto"
    first_dtype = auto_dtype(device) if auto else dtype  # the project's one rule: fp16 on GPU, fp64 on CPU
    torch.manual_seed(seed)
    info = device_info(device)
    bw = copy_bandwidth(device)
    log(f"[perf] {model} on {info.get('card')} (driver {info.get('driver')}, torch {info['torch']}); "
        f"copy bandwidth {bw and round(bw)} GB/s; run {run_id}")
    set_compile(compile and cuda)

    t0 = time.time()
    lm = load_for_perf(model, dtype=first_dtype, device=device, seed=seed)
    log(f"[perf] model ready in {time.time() - t0:.1f}s")
    wl = make_workload(lm.model.config, text_tokens=text_tokens, new_tokens=new_tokens, seed=seed)
    lang_path, _ = language_layers(lm.model)
    plan_runs = {"decode": max(1, new_tokens - 1) if objective != "prefill" else 0,
                 "prefill": 0 if objective == "decode" else 1}

    common = {"suite": suite, "model": model, "task": None, "metric": "perf", "value": None,
              "stderr": None, "n_empty": None, "n_unparsed": None, "device": info.get("card"),
              "card": info.get("card"), "driver": info.get("driver"), "torch": info["torch"],
              "copy_bandwidth_gbs": bw, "versions": info, "git": git_describe(), "seed": seed,
              "run_id": run_id, "workload": wl.describe(), "model_path": lm.path, "objective": objective,
              "command": " ".join(shlex.quote(a) for a in sys.argv)}
    ctx = _Ctx(lm=lm, wl=wl, out=out, common=common, batches=list(batches), new_tokens=new_tokens,
               warmup=warmup, reps=reps, gate=gate, gate_tokens=gate_tokens, compile=compile,
               graphs=graphs, device=device, kernels=kernels, overrides=overrides, plan_runs=plan_runs,
               lang_path=lang_path, log=log, seed=seed,
               trained_gate="on" if trained_gate == "on" or (trained_gate == "auto" and cuda) else "off")
    variants = perf_variants(methods)
    reference = variants[0]
    pairs = [(reference, float_variant()[1])] + [(v, s) for v in variants[1:] for s in schemes]
    budget = Budget(time_budget_s, len(pairs) + (1 if auto and cuda else 0))
    records: list[dict] = []
    wanted = []
    for i, (var, s) in enumerate(pairs):
        v = Case(var, s, lm.dtype)
        records += ctx.run_variant(v, budget, share=i)
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
            records += ctx.run_variant(v, budget, share=0 if v.is_reference else budget.shares - 1)
    skipped = [(r["method"], r["scheme"], r["dtype"], r["batch_size"]) for r in records
               if str(r.get("error") or "").startswith("not run")]
    if skipped:
        log(f"[perf] not run (time budget {time_budget_s}s): {skipped}")
    if leaderboard:
        write_perf_table(out / "records.jsonl", out / "leaderboard.md")
    log(f"[perf] done in {time.time() - t_start:.0f}s")
    return records


@dataclass
class _Ctx:
    lm: object
    wl: Workload
    out: Path
    common: dict
    batches: list
    new_tokens: int
    warmup: int
    reps: int
    gate: str
    gate_tokens: int
    compile: bool
    graphs: bool
    device: str
    kernels: list | None
    overrides: dict
    plan_runs: dict
    lang_path: str
    log: object
    trained_gate: str = "auto"
    seed: int = 0
    _trained_lm: object = None
    float_e2e: dict = field(default_factory=dict)  # dtype -> the float engine's end-to-end error
    float_trained: dict = field(default_factory=dict)  # dtype -> the float engine's trained-model exact record

    # -- one variant ---------------------------------------------------------------------------

    def _record(self, v: Case, B: int, **fields) -> dict:
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
                                       self.common["objective"]]))
        rec.update(fields)
        rec.pop("timestamp", None)
        return write_perf_record(self.out / "records.jsonl", **rec)

    def _quantize(self, v: Case, lm, wl: Workload, exact: bool = False):
        """State of ``v`` on ``lm`` by the accuracy path (``prepare_state``) and its simulated
        reference (None state for the float baseline).

        ``exact``: also the float64 copy of the simulated model's logits (``gate.exact_reference``;
        small models only: it copies the model)."""
        ids1, pix1 = wl.batch(1)
        ids1, pix1 = ids1.to(self.device), pix1.to(self.device, lm.dtype)
        v.qcfg = parse_scheme(v.scheme, **({} if v.is_reference else self.overrides))

        def reference():
            v.ref = gate_mod.simulated_reference(lm.model, ids1, pix1, self.gate_tokens)
            if exact:
                m64 = copy.deepcopy(lm.model).to(torch.float64)
                v.ref.exact = gate_mod.exact_reference(m64, ids1, pix1, v.ref)
                del m64

        if v.is_reference:
            reference()
            return None
        state, v.state_key = perf_state(lm, v.variant, v.qcfg, wl, seed=self.seed)
        v.quantize_s = state.meta.get("quantize_s")
        v.proof = dict(state.meta.get("proof") or state.proof())
        v.state_meta = {k: state.meta.get(k) for k in ("act_ranges", "calibration")}
        handle = apply_state(lm.model, state, device=self.device)
        try:
            reference()
            v.proof["act_quantizers_fired"] = gate_mod.fake_linears_fired(lm.model)
        finally:
            handle.restore()
        return state

    def _blocks(self, model, state, dtype):
        return state_blocks(model, state, device=self.device, dtype=dtype)

    def run_variant(self, v: Case, budget: Budget, share: int) -> list[dict]:
        log, lm = self.log, self.lm
        recs = []
        if not budget.allow(share, True):
            return [self._record(v, B, error=f"not run: time budget of {budget.seconds:.0f}s spent")
                    for B in self.batches]
        blocks = None
        try:
            state = self._quantize(v, lm, self.wl)
            blocks = self._blocks(lm.model, state, lm.dtype)
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
            engine = LlavaEngine(lm.model, blocks, compile=self.compile, graphs=self.graphs,
                                 float_params=v.float_params)
            ids, pix = wl.batch(B)
            engine.setup(ids, pix, self.new_tokens)
            lin = _parts(engine)
            for m in lin:
                if isinstance(m, RealLinear):
                    m.choice.clear()
                    m.restore_ours()
            T = wl.input_ids.shape[1]
            plan = [("decode", B, float(self.plan_runs["decode"])), ("prefill", B * T, float(self.plan_runs["prefill"]))]
            sel = select_kernels(lin, plan=plan, dtype=lm.dtype, only=self.kernels, log=log)
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
            g = gate_mod.check(engine, v.ref, act_quant=v.act_quant, policy=self.gate,
                               float_e2e=self.float_e2e.get(v.dtype) if not v.is_reference else None)
            if engine.fused:
                g["producers"] = gate_mod.check_producers(engine, v.ref)
                g["passed"] = bool(g["passed"] and g["producers"]["passed"])
            if v.is_reference and g.get("e2e_rel_logit_err") is not None:
                self.float_e2e[v.dtype] = g["e2e_rel_logit_err"]
            if self.trained_gate != "off" and v.trained is None:
                v.trained = self._trained(v, engine)
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
                lat = time_generate(engine, warmup=self.warmup, reps=self.reps)
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

    # -- the trained-model gate ----------------------------------------------------------------

    def _trained(self, v: Case, big: LlavaEngine) -> dict:
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
            wl = make_workload(tlm.model.config, text_tokens=24, new_tokens=self.gate_tokens + 1, seed=1)
            state = self._quantize(tv, tlm, wl, exact=True)  # the same method and options, this model
            blocks = self._blocks(tlm.model, state, tlm.dtype)
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
                        p._dtype = tlm.dtype
                        for ph in ("decode", "prefill"):
                            want = roles[key].get(ph)
                            if want and want in p.candidates(ph, self.device, opt_in=self.kernels or (),
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
            for p in _parts(engine):
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
