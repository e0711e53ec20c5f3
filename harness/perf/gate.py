"""The correctness gate: the real-kernel engine against the simulated model built from the same state.

Two checks, both on the same sample (the benchmark prompt, batch row 0):

layerwise (teacher-forced)
    the inputs and outputs of the simulated linears of a few decoder layers are captured during
    the simulated forward; the engine's real-kernel layers are run on exactly those inputs, in
    the prefill kernels (all prompt rows) and the decode kernels (the last ``batch`` rows).
    Relative error must be <= ``tol``. This checks every kernel that will be timed. With an
    activation quantizer, an error above ``tol`` is re-examined: if the engine's (compiled)
    quantizer differs from the simulated model's (eager) only at exact rounding ties
    (``real.quantizer_ties``), the layer's error is the larger of kernel-vs-simulated-arithmetic
    on the engine's quantized input and state-vs-captured-output; the split is recorded under
    ``layerwise_rounding_ties``.
end-to-end
    logits after the prompt and after each of ``n_tokens`` greedy tokens of the simulated model,
    fed to the engine (teacher forcing): relative logit error <= the tolerance of the run's dtype
    (``e2e_tolerance``) and the same greedy token at every step.
fused quantizers (``check_producers``)
    where the engine quantizes activations inside the op that produces them, those producers are
    run on the simulated model's captured inputs (RMSNorm inputs, gate/up outputs, attention
    outputs) and their codes compared with the simulated quantizer applied to the same values:
    equal up to one step at exact rounding ties; the float part (the normalized or gated value)
    within ``tol`` of the simulated model's.

The runner adds an end-to-end check on the bundled *trained* model with the same kernels
(``benchmark.TrainedGate``, policy ``exact``): random weights amplify one-step code flips through
32-40 layers, a trained model much less. Its reference is the same simulated model in float64
(``exact_reference``), and the allowed error is twice the noise of correct implementations in the
run dtype, measured in the same call (the eager simulated model's and the float engine's distance
to float64): on the bundled model the eager fp16 W4A4 model is itself ~0.3 from float64, so no
fixed tolerance against the eager model could tell a kernel bug from the method's own rounding.

End-to-end tolerance and dtype: the tolerance is ``tol`` for fp16 and scales with the unit
roundoff of the run's dtype (bf16: 8 x ``tol``), because the engine and the eager simulated model
round in different orders; a quantized variant may also be as far from its simulated model as
``FLOAT_MARGIN`` x the float engine's own error in the same dtype and call.

With activation quantization, the end-to-end error is dominated by rounding-boundary flips:
a 1-ulp difference in a quantizer's input (fp16 accumulation order) moves a code by a whole
step, and 30+ layers amplify that. On random LLaVA weights an exact integer kernel lands at
~2% (w8a8), ~8% (w6a6), ~30% (w4a4) relative logit error from the fp16 simulated model
(docs/benchmarks/perf.md). Policy ``strict`` applies both checks to every variant; policy
``auto`` (default) applies both to weight-only and float variants and the layerwise check to
activation-quantized ones, and the record keeps both numbers and verdicts. Under ``auto`` a greedy
token that differs only where the simulated model's own gap between the two tokens is below
``tol x rms(logits)`` counts as a tie (recorded in ``token_mismatches``); ``strict`` counts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..kernels import fused
from ..kernels import real as real_mod
from ..kernels.real import quantizer_ties, rel_err
from ..models.layers import language_layers
from ..quant.simulated import FakeQuantLinear
from .images import first_image, image_inputs, images_to

GATE_TOL = 1e-2
FLOAT_MARGIN = 2.0  # a quantized variant may be this many times as far off as the float engine
NORMS = ("input_layernorm", "post_attention_layernorm")


def e2e_tolerance(dtype: torch.dtype, tol: float = GATE_TOL, float_e2e: float | None = None) -> float:
    """``tol`` at fp16, scaled by the dtype's unit roundoff where it is coarser (bf16: 8x); at least
    ``FLOAT_MARGIN`` x the float engine's end-to-end error in the same dtype, when given."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float16).eps
    out = tol * max(1.0, eps / torch.finfo(torch.float16).eps)
    if float_e2e is not None:
        out = max(out, FLOAT_MARGIN * float(float_e2e))
    return out
SIBLING_KEYS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "o": ("self_attn.o_proj",), "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
                "down": ("mlp.down_proj",)}


@dataclass
class ExactReference:
    """The same simulated model in float64, teacher-forced on the run dtype's greedy tokens.

    ``sim_err``: how far the run dtype's eager simulated model itself is from it (relative logit
    error), ``sim_dev``: its largest absolute logit deviation per step. A correct engine cannot be
    expected to be closer to the exact model than a correct eager implementation in the same dtype.
    """

    logits: torch.Tensor  # [1 + n_tokens, vocab] float64
    sim_err: float
    sim_dev: list[float]


@dataclass
class SimReference:
    """What the simulated model did on the gate sample."""

    logits: torch.Tensor  # [1 + n_tokens, vocab] float32
    tokens: list[int]  # greedy tokens, len 1 + n_tokens
    io: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # linear path -> (in, out)
    layers: list[int] = field(default_factory=list)
    exact: ExactReference | None = None


def _forward_inputs(model, input_ids, pixel_values) -> dict:
    """``model(...)``'s keyword arguments for the prompt (and tokens after it) with its picture
    (a ``pixel_values`` tensor, or the family's dict of image inputs: ``images``)."""
    from ..models.family import UnknownFamilyError, adapter_for

    imgs = image_inputs(pixel_values)
    try:
        adapter = adapter_for(model)
    except UnknownFamilyError:
        return {"input_ids": input_ids, **imgs}
    return adapter.forward_inputs(model, input_ids, imgs)


def _last_logits(model, input_ids, pixel_values):
    kw = _forward_inputs(model, input_ids, pixel_values)
    try:
        out = model(**kw, use_cache=False, logits_to_keep=1)
    except TypeError:
        out = model(**kw, use_cache=False)
    return out.logits[:, -1].float()


def gate_layers(n_layers: int) -> list[int]:
    return sorted({0, n_layers // 2, n_layers - 1})


@torch.no_grad()
def simulated_reference(model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                        n_tokens: int, layers: list[int] | None = None) -> SimReference:
    """Greedy run of ``model`` as it stands (float or with a state applied) on one sample."""
    lang_path, mods = language_layers(model)
    layers = gate_layers(len(mods)) if layers is None else layers
    io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for i in layers:
        for names in [*SIBLING_KEYS.values(), NORMS]:
            for n in names:
                path = f"{lang_path}.{i}.{n}"
                try:
                    mod = model.get_submodule(path)
                except AttributeError:
                    continue

                seen: dict = {}

                def pre(_m, args, _p=path, _seen=seen):
                    # the layer's input before its online transform (a first pre-hook of its own,
                    # registered after this one with prepend): what the engine's layer is given
                    if _p not in io and _p not in _seen:
                        _seen[_p] = args[0].detach().reshape(-1, args[0].shape[-1]).to("cpu")

                def hook(_m, args, out, _p=path, _seen=seen):
                    if _p not in io:  # kept in host memory: it must not count in the engines' peak
                        io[_p] = (_seen.pop(_p), out.detach().reshape(-1, out.shape[-1]).to("cpu"))
                hooks.append(mod.register_forward_pre_hook(pre, prepend=True))
                hooks.append(mod.register_forward_hook(hook))
    ids = input_ids[:1]
    pix = first_image(pixel_values)
    logits, tokens = [], []
    try:
        for _ in range(n_tokens + 1):
            lg = _last_logits(model, ids, pix)[0]
            for h in hooks:
                h.remove()
            hooks = []
            t = int(lg.argmax())
            logits.append(lg)
            tokens.append(t)
            ids = torch.cat([ids, torch.tensor([[t]], device=ids.device, dtype=ids.dtype)], dim=1)
    finally:
        for h in hooks:
            h.remove()
    return SimReference(logits=torch.stack(logits), tokens=tokens, io=io, layers=layers)


@torch.no_grad()
def exact_reference(model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                    ref: SimReference) -> ExactReference:
    """Teacher-forced float64 logits of ``model`` (the simulated model with its state applied, its
    parameters cast to float64 from the run dtype's values) on ``ref``'s prompt and tokens.

    The activation quantizers compute their ranges in float32 (``quantizer.qparams``), so this is
    the simulated arithmetic at float32/float64 precision, not the run dtype's."""
    ids = input_ids[:1]
    n = len(ref.tokens)
    if n > 1:
        ids = torch.cat([ids, torch.tensor([ref.tokens[:-1]], device=ids.device, dtype=ids.dtype)], dim=1)
    pix = images_to(first_image(pixel_values), dtype=torch.float64)
    kw = _forward_inputs(model, ids, pix)
    try:
        out = model(**kw, use_cache=False, logits_to_keep=n)
    except TypeError:
        out = model(**kw, use_cache=False)
    logits = out.logits[0, -n:].double()
    sim = ref.logits.to(logits.device).double()
    return ExactReference(logits=logits.cpu(), sim_err=rel_err(sim, logits),
                          sim_dev=(sim - logits).abs().amax(-1).tolist())


def _exact_check(real: torch.Tensor, ref: SimReference, e2e_tol: float, tol: float,
                 float_exact: dict | None = None) -> dict:
    """The engine against the float64 reference.

    The noise of a correct implementation in the run dtype is measured, not assumed: the eager
    simulated model's own distance to the float64 model (``ref.exact``) and, when given, the float
    engine's distance to its float64 model in the same call (``float_exact``: the float variant's
    ``rel_logit_err`` and ``real_max_dev``). Passes when the relative logit error is within
    ``e2e_tol`` or ``FLOAT_MARGIN`` x that noise, and the float64 model's greedy token is kept at
    every step except where its gap between the two tokens is within ``FLOAT_MARGIN`` x the largest
    logit deviation of those implementations over the steps (per-step deviations vary by 10x
    between equally correct implementations) or ``tol`` x rms(logits)."""
    ex = ref.exact
    exact = ex.logits.to(real.device)
    err = rel_err(real, exact)
    noise_err, noise_dev = ex.sim_err, max(ex.sim_dev)
    if float_exact:
        noise_err = max(noise_err, float_exact["rel_logit_err"])
        noise_dev = max(noise_dev, max(float_exact["real_max_dev"]))
    allowed = max(e2e_tol, FLOAT_MARGIN * noise_err)
    want = exact.argmax(-1).tolist()
    got = real.argmax(-1).tolist()
    flips = []
    for i, (a, b) in enumerate(zip(want, got)):
        if a != b:
            flips.append({"step": i, "exact": a, "real": b, "gap": float(exact[i, a] - exact[i, b]),
                          "tie_tol": max(float(tol * exact[i].pow(2).mean().sqrt()), FLOAT_MARGIN * noise_dev)})
    tokens_ok = all(f["gap"] <= f["tie_tol"] for f in flips)
    return {"rel_logit_err": err, "tol": allowed, "sim_rel_logit_err": ex.sim_err,
            "sim_max_dev": ex.sim_dev, "real_max_dev": (real.double() - exact.double()).abs().amax(-1).tolist(),
            "noise_rel_logit_err": noise_err, "noise_max_dev": noise_dev,
            "float_engine": {k: float_exact[k] for k in ("rel_logit_err", "real_max_dev")} if float_exact else None,
            "tokens_exact": want, "token_flips": flips, "tokens_match_up_to_ties": tokens_ok,
            "passed": bool(err <= allowed and tokens_ok)}


def _layer_error(mod, x: torch.Tensor, want: torch.Tensor, tol: float, key: str, ties: dict) -> float:
    """Relative error of an engine layer against the captured simulated output.

    Above ``tol`` with an activation quantizer, the error is split: the kernel against the
    simulated arithmetic fed by the engine's own quantizer, and the layer's state against the
    captured output with the simulated model's quantizer. When the two quantizers differ only at
    rounding ties (``quantizer_ties``), the larger of those two errors is the layer's error; the
    split is kept in ``ties[key]``.
    """
    total = rel_err(mod(x), want)
    if total <= tol or getattr(mod, "act", None) is None:
        return total
    xt = mod.transform(x) if hasattr(mod, "transform") else x  # what the quantizer sees
    q = quantizer_ties(xt, mod.act)
    kernel = rel_err(mod(x), mod.run("simulated", xt))
    state = rel_err(mod.simulated(x), want)
    ties[key] = {"total": total, "kernel": kernel, "state": state, "quantizer": q}
    return max(kernel, state) if q["non_tie"] == 0 else total


@torch.no_grad()
def layerwise_errors(engine, ref: SimReference, model_lang_path: str, tol: float = GATE_TOL,
                     ties: dict | None = None) -> dict[str, float]:
    """Engine layers on the captured simulated inputs: relative error per layer and phase.

    ``ties`` (if given) receives, per layer whose plain error exceeds ``tol``, how much of it is
    rounding ties of the activation quantizer (see ``_layer_error``).
    """
    errs = {}
    ties = {} if ties is None else ties
    B = engine.batch or 1
    for i in ref.layers:
        blk = engine.blocks[i]
        for key, names in SIBLING_KEYS.items():
            paths = [f"{model_lang_path}.{i}.{n}" for n in names]
            if not all(p in ref.io for p in paths):
                continue
            mod = getattr(blk, key)
            x = ref.io[paths[0]][0].to(engine.device)
            want = torch.cat([ref.io[p][1] for p in paths], dim=-1).to(engine.device)
            name = f"layers.{i}.{key}"
            errs[f"{name}.prefill"] = _layer_error(mod, x, want, tol, f"{name}.prefill", ties)
            rows = min(B, x.shape[0])
            if rows <= 64:
                errs[f"{name}.decode"] = _layer_error(mod, x[-rows:], want[-rows:], tol, f"{name}.decode", ties)
    return errs


@torch.no_grad()
def check(engine, ref: SimReference, *, act_quant: bool, policy: str = "auto",
          tol: float = GATE_TOL, float_e2e: float | None = None, float_exact: dict | None = None) -> dict:
    """Run both checks; returns the gate record (``passed`` decides whether the variant is timed).

    ``float_e2e``: the float engine's end-to-end error in the same dtype and call (see
    ``e2e_tolerance``); ``float_exact``: the float engine's ``exact`` record on the same model and
    dtype (see ``_exact_check``)."""
    lang_path, _ = language_layers(engine.model)
    rounding_ties: dict = {}
    layer = layerwise_errors(engine, ref, lang_path, tol, rounding_ties)
    real = engine.teacher_forced_logits(ref.tokens[:-1])[0].float()
    sim = ref.logits.to(real.device)
    e2e = rel_err(real, sim)
    real_tokens = real.argmax(-1).tolist()
    match = real_tokens == ref.tokens
    top2 = sim.topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    # a differing token is a tie when the simulated model itself separates the two tokens by less
    # than the allowed logit error (tol x the rms of that step's logits): random-weight models have
    # near-ties that any rounding difference can flip
    ties = []
    for i, (a, b) in enumerate(zip(ref.tokens, real_tokens)):
        if a != b:
            gap = float(sim[i, a] - sim[i, b])
            ties.append({"step": i, "sim": a, "real": b, "gap": gap,
                         "tie_tol": float(tol * sim[i].pow(2).mean().sqrt())})
    match_or_tie = all(t["gap"] <= t["tie_tol"] for t in ties)
    rows_agree = None
    if engine.batch and engine.batch > 1:
        full = engine.logits
        rows_agree = float((full - full[:1]).abs().max() / full[:1].abs().max().clamp_min(1e-30))
    layer_max = max(layer.values()) if layer else 0.0
    layer_ok = layer_max <= tol
    e2e_tol = e2e_tolerance(getattr(engine, "dtype", None) or torch.float16, tol, float_e2e)
    e2e_ok = e2e <= e2e_tol and match
    exact = _exact_check(real, ref, e2e_tol, tol, float_exact) if ref.exact is not None else None
    e2e_ok_ties = e2e <= e2e_tol and match_or_tie
    if policy == "strict":
        passed = layer_ok and e2e_ok
    elif policy == "auto":
        passed = layer_ok and (e2e_ok_ties or act_quant)
    elif policy == "exact":
        if exact is None:
            raise ValueError("gate policy 'exact' needs a float64 reference (SimReference.exact)")
        passed = layer_ok and exact["passed"]
    else:
        raise ValueError(f"unknown gate policy {policy!r}; valid: auto, strict, exact")
    return {
        "policy": policy, "tol": tol, "passed": bool(passed), "strict_passed": bool(layer_ok and e2e_ok),
        "layerwise_max_rel_err": layer_max, "layerwise_ok": layer_ok, "layerwise": layer,
        "layerwise_rounding_ties": rounding_ties,
        "e2e_rel_logit_err": e2e, "e2e_tol": e2e_tol, "float_e2e": float_e2e,
        "e2e_tokens_match": match, "e2e_ok": e2e_ok,
        "e2e_tokens_match_up_to_ties": match_or_tie, "token_mismatches": ties,
        "tokens_sim": ref.tokens, "tokens_real": real_tokens,
        "min_top2_margin": min(margins) if margins else None,
        "batch_rows_max_rel_diff": rows_agree, "n_tokens": len(ref.tokens), "exact": exact,
    }


def combine(g: dict, trained: dict) -> bool:
    """The verdict once the trained-model gate has run. ``auto``: this model's layerwise check (and
    the fused quantizers' check) plus the trained model's end-to-end check; the random-weight
    end-to-end numbers stay in the record but do not decide (they amplify rounding differences
    through 32-40 layers: the fp16 engine is 5e-3 from transformers' eager model there at 9e-5 per
    layer). ``strict``: every check, the random-weight end to end included."""
    producers = g.get("producers", {}).get("passed", True)
    ok = g["layerwise_ok"] if g["policy"] == "auto" else g["strict_passed"]
    return bool(ok and producers and trained.get("passed"))


def _worst_producer(pc: dict) -> str:
    bad = [(k, c) for k, c in pc.get("checks", {}).items()
           if c["non_tie"] or c["scale_mismatch"] or c.get("rowsum_mismatch") or c["float_err"] > GATE_TOL
           or c.get("transform_err", 0.0) > GATE_TOL]
    if not bad:
        return ""
    k, c = bad[0]
    return (f" ({len(bad)} bad, first {k}: non-tie codes {c['non_tie']}, scales {c['scale_mismatch']}, "
            f"row sums {c.get('rowsum_mismatch', 0)}, float err {c['float_err']:.1e}"
            + (f", transform err {c['transform_err']:.1e}" if "transform_err" in c else "") + ")")


def failed_checks(g: dict) -> list[str]:
    """Which parts of a gate record failed, in words (for the log and the record's ``failed``)."""
    out = []
    if not g.get("layerwise_ok", True):
        worst = max(g["layerwise"], key=g["layerwise"].get)
        out.append(f"layerwise {g['layerwise_max_rel_err']:.2e} at {worst}")
    if g.get("policy") == "strict" and not g.get("e2e_ok", True):
        out.append(f"end-to-end {g['e2e_rel_logit_err']:.2e} (tol {g['e2e_tol']:.1e}, "
                   f"tokens {'same' if g['e2e_tokens_match'] else 'differ'})")
    if "producers" in g and not g["producers"]["passed"]:
        out.append("fused quantizers" + _worst_producer(g["producers"]))
    tr = g.get("trained") or {}
    if tr.get("ran") and not tr.get("passed"):
        if tr.get("error"):
            out.append(f"trained model: {tr['error']}")
        ex = tr.get("exact") or {}
        if tr.get("layerwise_max_rel_err", 0) > GATE_TOL:
            lw = tr.get("layerwise") or {"?": 0}
            out.append(f"trained layerwise {tr['layerwise_max_rel_err']:.2e} at {max(lw, key=lw.get)}")
        if ex and not ex["passed"]:
            flips = [f"step {f['step']} gap {f['gap']:.3g} > {f['tie_tol']:.3g}" for f in ex["token_flips"]
                     if f["gap"] > f["tie_tol"]]
            out.append(f"trained end-to-end vs float64 {ex['rel_logit_err']:.2e} (tol {ex['tol']:.1e}; measured "
                       f"noise {ex.get('noise_rel_logit_err', ex['sim_rel_logit_err']):.1e})"
                       + (f", token flips beyond noise: {', '.join(flips)}" if flips else ""))
        if "producers" in tr and not tr["producers"]["passed"]:
            out.append("trained fused quantizers" + _worst_producer(tr["producers"]))
    return out


@torch.no_grad()
def check_producers(engine, ref: SimReference, tol: float = GATE_TOL) -> dict:
    """The engine's fused quantizers on the simulated model's captured inputs (see the module doc).

    Per gate layer and phase whose kernel takes quantized input: ``codes`` (``fused.check_codes``:
    mismatches, how many are not rounding ties, scale mismatches) and ``float_err`` (the producer's
    unquantized output against the simulated model's linear input); for a layer with an online
    transform the engine's ``online_q`` (fused kernel or eager) is checked the same way on its own
    transformed values, and ``transform_err`` is those values against the eager transform. Passes
    when no mismatch is outside a tie and every ``float_err`` and ``transform_err`` is ``<= tol``."""
    lang_path, _ = language_layers(engine.model)
    dev, dt = engine.device, engine.dtype
    out: dict = {"checks": {}, "passed": True}
    B = engine.batch or 1

    def captured(path, which=0):
        t = ref.io.get(path)
        return None if t is None else t[which].to(dev, dt)

    for i in ref.layers:
        blk = engine.blocks[i]
        pre = f"{lang_path}.{i}"
        for key, make in (
                ("qkv", lambda x, a, m, b=blk: fused.add_rms_norm_q(x, None, b.ln1, engine.eps, a, m)[1]),
                ("gate_up", lambda x, a, m, b=blk: fused.add_rms_norm_q(x, None, b.ln2, engine.eps, a, m)[1]),
                ("down", lambda x, a, m: fused.silu_mul_q(x, a, m)),
                ("o", lambda x, a, m: fused.rows_q(x, a, m))):
            layer = getattr(blk, key)
            if not hasattr(layer, "input_mode") or layer.act is None:
                continue
            if key == "qkv":
                src, want = captured(f"{pre}.input_layernorm"), captured(f"{pre}.self_attn.q_proj")
            elif key == "gate_up":
                src, want = captured(f"{pre}.post_attention_layernorm"), captured(f"{pre}.mlp.gate_proj")
            elif key == "down":
                g, u = captured(f"{pre}.mlp.gate_proj", 1), captured(f"{pre}.mlp.up_proj", 1)
                src = None if g is None or u is None else torch.cat([g, u], dim=-1)
                want = captured(f"{pre}.mlp.down_proj")
            else:
                src = want = captured(f"{pre}.self_attn.o_proj")
            if src is None or want is None:
                continue
            for step, x in (("prefill", src), ("decode", src[-B:])):
                phase = "decode" if x.shape[0] <= real_mod.DECODE_MAX_ROWS else "prefill"  # as the engine
                mode = layer.input_mode(phase)
                if mode.kind == "float":
                    continue
                h = make(x, None, fused.FLOAT_INPUT)
                if getattr(layer, "input_transform", None) is not None:
                    # as the engine (``online_q``): the transform and the quantizer, fused or eager;
                    # the codes against the simulated quantizer on the same transformed values, and
                    # those values against the eager transform of the producer's output
                    inp, silu = (x, True) if key == "down" else (x, False) if key == "o" else (h, False)
                    ht = engine.online_q(layer, inp, fused.FLOAT_INPUT, silu=silu)
                    p = engine.online_q(layer, inp, mode, silu=silu)
                    c = fused.check_codes(ht, p, layer.act)
                    c["transform_err"] = rel_err(ht, layer.transform(h))
                    c["online"] = engine.online_impl.get(f"layers.{i}.{key}")
                else:
                    p = make(x, layer.act, mode)
                    c = fused.check_codes(h, p, layer.act)
                c["float_err"] = rel_err(h, want if step == "prefill" else want[-B:])
                c["mode"] = mode.kind + ("-fp8" if mode.fp8 else "")
                out["checks"][f"layers.{i}.{key}.{step}"] = c
                if c["non_tie"] or c["scale_mismatch"] or c.get("rowsum_mismatch") or c["float_err"] > tol \
                        or c.get("transform_err", 0.0) > tol:
                    out["passed"] = False
    return out


def fake_linears_fired(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, FakeQuantLinear) and m.act is not None
               and m.act_calls > 0)
