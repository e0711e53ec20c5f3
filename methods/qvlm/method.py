"""The Q-VLM methods: the paper's method, its Table 1 ablations, and the ``fp16+veo`` control.

| name             | VEO | CDM + joint block search | search                      |
|------------------|-----|--------------------------|-----------------------------|
| ``qvlm``         | yes | yes                      | joint inside mined blocks   |
| ``qvlm-cdm``     | no  | yes                      | joint inside mined blocks   |
| ``qvlm-veo``     | yes | no                       | layer-wise                  |
| ``qvlm-layerwise`` | no | no                      | layer-wise (the ablation's baseline) |
| ``fp16+veo``     | yes | –                        | none: float language model (a control) |

The four Q-VLM names share one ``defaults`` dict (the paper's settings where the paper gives them)
and one ``presets`` dict (``fast``: the laptop budget of the default suite), so one options block
applies to every row of the ablation; options a variant does not use are recorded but have no
effect (``meta["stages"]`` says which stages ran). Pipeline: VEO (float vision encoder) -> CDM on
the float model with the optimized encoder -> sequential search over the language layers, each
block fed by the already-quantized previous blocks (``harness.quant.blockwise``). Linears of other
quantized parts (vision, projector, lm_head, when the scheme's ``parts`` name them) get
round-to-nearest weights; their static activation ranges are the engine's (left ``None``).

The searched layers' activation statistics come from the engine's ``weights`` stream, the one
every other row's static ranges come from (``range_stream: weights``; ``float``, the paper's
full-precision stream, is a control). ``objective: linear`` (a control, layer-wise only) chooses
the percentiles by the engine's ``+clip`` objective in this row's coordinates
(``linear_objective.py``); methods/qvlm/README.md, "Rows and what their contrasts measure".
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from typing import Any, ClassVar

import torch

from harness.models.layers import language_layers
from harness.quant.build import act_quantizer, linear_from_weight, target_linears
from harness.quant.config import QuantConfig
from harness.quant.blockwise import part_inputs
from harness.quant.grid import unclipped_first
from harness.quant.ranges import fill_static_ranges, rule_for
from harness.quant.simulated import apply_state
from harness.quant.state import QuantState
from harness.quant.ties import improves
from harness.registry import Method, register_method

from .dependency import check_h0, mine_dependencies, partition, resolve_h0
from .encoder import JACOBIAN_FALLBACKS, VEOConfig, optimize_vision_encoder
from .linear_objective import linear_objective_search
from .search import COORDINATES, DEFAULT_GRID, EXHAUSTIVE_MAX, RANGE_STREAMS, sequential_search, stream_stats

VEO_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "cdm_tau": 0.01,  # soft-assignment temperature, code units squared (Eq. 5; L_ent uses it too)
    "veo_epochs": 10,  # paper
    "veo_lr": 1e-5,
    "veo_optimizer": "adamw",
    "veo_weight_decay": 0.0,
    "veo_lambda1": 0.1,  # weight of L_ent
    "veo_lambda2": 1.0,  # weight of L_err
    "veo_eta": 1.0,  # weight of the final-output error inside L_err
    "veo_samples": 16384,  # positions per step for the differentiable entropy
    "veo_micro_batch": "auto",  # chunk size for memory: int, null (whole batch) or "auto"
    "veo_jacobian_batches": None,  # batches for the Jacobian weights of L_ent (None: all)
    "veo_jacobian_fallback": "error",  # "error": fail the cell; "uniform": run on, recorded
    "veo_report": True,  # record the loss terms before/after on the calibration set (2 passes)
}

DEFAULTS: dict[str, Any] = {
    **VEO_DEFAULTS,
    # search (§2)
    "grid": list(DEFAULT_GRID),  # clipping percentiles, unclipped first (paper: 1.0..0.98 by 0.005)
    "coordinates": "layer",  # one percentile per layer (5**3 = 125: blocks searched exhaustively), or "group"
    "search_weights": False,  # paper/official code: activation clipping only; True also searches weights
    "exhaustive_max": EXHAUSTIVE_MAX,  # joint search enumerates up to this many combinations
    "search_batches": None,  # calibration batches in the search objective (None: all)
    # the stream the searched layers' activation statistics (ranges, percentiles) come from:
    # "weights", the engine's (every other row's); "float", the paper's full-precision stream (a control)
    "range_stream": "weights",
    # what a percentile is chosen by: "output", the paper's error at the layer's (Eq. 2) or block's
    # (Eq. 3) output; "linear", the engine's +clip objective in these coordinates (a control, layer-wise only)
    "objective": "output",
    # dependency mining (§1)
    "max_block": 3,  # paper
    "h0_rule": "median",  # Eq. 7's threshold: "median" or "mean" of the adjacent dependencies, or "absolute"
    "h0": None,  # the threshold in nats for h0_rule "absolute" (null otherwise)
    "cdm_samples": 65536,  # activation positions sampled for the joint distribution
    "cdm_bits": 8,  # entropy grid when activations stay in float (else the scheme's a_bits)
}

# The default suite's laptop budget: 2 of the 8 search batches in the objective, one VEO epoch
# with Jacobian weights from one batch and no before/after report.
OBJECTIVES = ("output", "linear")
FAST_VEO = {"veo_epochs": 1, "veo_report": False, "veo_jacobian_batches": 1}
FAST = {"search_batches": 2, **FAST_VEO}


def veo_config(o: dict) -> VEOConfig:
    micro = o["veo_micro_batch"]
    return VEOConfig(epochs=int(o["veo_epochs"]), lr=float(o["veo_lr"]),
                     optimizer=o["veo_optimizer"], weight_decay=float(o["veo_weight_decay"]),
                     lambda1=float(o["veo_lambda1"]), lambda2=float(o["veo_lambda2"]),
                     eta=float(o["veo_eta"]), tau=float(o["cdm_tau"]),
                     samples=int(o["veo_samples"]),
                     micro_batch=micro if micro in (None, "auto") else int(micro),
                     jacobian_batches=o["veo_jacobian_batches"],
                     jacobian_fallback=o["veo_jacobian_fallback"], report=bool(o["veo_report"]),
                     seed=int(o["seed"]))


def validate_veo(o: dict) -> None:
    if int(o["veo_epochs"]) < 0:
        raise ValueError("veo_epochs must be >= 0")
    micro = o["veo_micro_batch"]
    if not (micro is None or micro == "auto" or (isinstance(micro, int) and micro >= 1)):
        raise ValueError(f"veo_micro_batch must be a positive integer, null or 'auto', got {micro!r}")
    if o["veo_jacobian_fallback"] not in JACOBIAN_FALLBACKS:
        raise ValueError(f"veo_jacobian_fallback must be one of {JACOBIAN_FALLBACKS}, "
                         f"got {o['veo_jacobian_fallback']!r}")


def run_veo(model, qcfg: QuantConfig, calib, o: dict, meta: dict) -> tuple[dict, float]:
    """VEO on ``model`` for ``qcfg``; fills ``meta["veo"]`` (and ``meta["warnings"]`` on a
    fallback). Returns ``(optimized vision parameters, seconds)``."""
    if not any("pixel_values" in b for b in calib.batches):
        meta["veo_skipped"] = "calibration batches carry no images"
        return {}, 0.0
    if int(o["veo_epochs"]) <= 0:
        meta["veo_skipped"] = "veo_epochs is 0"
        return {}, 0.0
    t0 = time.perf_counter()
    params, info = optimize_vision_encoder(model, qcfg, calib.batches, veo_config(o))
    meta["veo"] = info
    if info.get("fallback"):
        meta.setdefault("warnings", []).append(f"VEO Jacobian weights: {info['fallback']}")
    return params, time.perf_counter() - t0


class QVLMBase(Method):
    """Shared implementation; subclasses pick the stages (not registered itself)."""

    use_cdm: bool = True
    use_veo: bool = True
    needs_calibration = True
    defaults = DEFAULTS
    presets: ClassVar[dict[str, dict]] = {"fast": FAST}

    def _validate(self) -> None:
        o = self.options
        grid = [float(p) for p in o["grid"]]
        if not grid or any(not 0 < p <= 1 for p in grid):
            raise ValueError(f"grid percentiles must lie in (0, 1], got {o['grid']}")
        if o["coordinates"] not in COORDINATES:
            raise ValueError(f"coordinates must be one of {COORDINATES}, got {o['coordinates']!r}")
        if o["range_stream"] not in RANGE_STREAMS:
            raise ValueError(f"range_stream must be 'weights' (the engine's stream, the default) or "
                             f"'float' (the paper's full-precision stream, a control row), got "
                             f"{o['range_stream']!r}; set range_stream: weights")
        if o["objective"] not in OBJECTIVES:
            raise ValueError(f"objective must be 'output' (the paper's, the default) or 'linear' (the "
                             f"engine's +clip objective, a control), got {o['objective']!r}; set "
                             f"objective: output")
        if o["objective"] == "linear":
            if self.use_cdm:
                raise ValueError(f"objective 'linear' (the engine's per-linear clipping objective) has no "
                                 f"block form, so {self.name!r} cannot use it: use it with qvlm-layerwise "
                                 f"or qvlm-veo, or set objective: output")
            if o["search_weights"] or o["range_stream"] != "weights":
                raise ValueError("objective 'linear' is the engine's activation clipping search on its "
                                 "weights stream: set search_weights: false and range_stream: weights, "
                                 "or objective: output")
        if o["search_batches"] is not None and int(o["search_batches"]) < 1:
            raise ValueError("search_batches must be a positive number of batches or None")
        if int(o["max_block"]) < 1:
            raise ValueError("max_block must be >= 1")
        if int(o["exhaustive_max"]) < 0:
            raise ValueError("exhaustive_max must be >= 0 (0: always coordinate descent)")
        if not isinstance(o["search_weights"], bool):
            raise ValueError(f"search_weights must be true or false, got {o['search_weights']!r}")
        check_h0(o["h0_rule"], o["h0"])
        validate_veo(o)

    def quantize(self, lm, qcfg: QuantConfig, calib) -> QuantState:
        self._validate()
        o = self.options
        state = QuantState(method=self.name, config=qcfg)
        meta: dict[str, Any] = {"stages": {"veo": self.use_veo, "cdm": self.use_cdm},
                                "options": copy.deepcopy(o)}
        state.meta = meta
        if qcfg.is_float:
            return state
        if calib is None or not calib.batches:
            raise ValueError(f"{self.name} needs calibration data")
        model = lm.model
        seed = int(o["seed"])  # every random draw uses its own generator seeded from this
        cost = {"veo": 0.0, "cdm": 0.0, "search": 0.0}
        t_all = time.perf_counter()

        # 1. visual encoder optimization (float)
        veo_params: dict[str, torch.Tensor] = {}
        if self.use_veo:
            veo_params, cost["veo"] = run_veo(model, qcfg, calib, o, meta)

        handle = apply_state(model, QuantState(self.name, qcfg, float_params=veo_params))
        try:
            targets = target_linears(model, qcfg)
            layers_path, layers = language_layers(model)
            in_layers = {n: m for n, m in targets.items() if n.startswith(layers_path + ".")}
            other = QuantState(self.name, qcfg)
            for n, m in targets.items():
                if n not in in_layers:
                    other.linears[n] = linear_from_weight(m.weight, qcfg, act=act_quantizer(qcfg))
            # the language layers' inputs come from the quantized other parts, activation
            # quantizers on; their static ranges are the engine's (left None in the state), so
            # the capture fills a copy by the engine's default rule
            capture = None
            if other.linears:
                capture = QuantState(self.name, qcfg, {n: replace(lq) for n, lq in other.linears.items()})
                fill_static_ranges(model, capture, list(calib.inputs()), rule_for(qcfg))
            entries = {}
            meta["objective"] = o["objective"]
            if in_layers and o["objective"] == "linear":
                # the control: the engine's +clip objective in this row's coordinates (layer-wise,
                # on the engine's weights stream; linear_objective.py)
                t0 = time.perf_counter()
                searched = QuantState(self.name, qcfg, {
                    n: linear_from_weight(m.weight, qcfg, act=act_quantizer(qcfg)) for n, m in targets.items()})
                chosen = {}
                if qcfg.quantizes_acts:
                    chosen = linear_objective_search(model, searched, list(in_layers), list(calib.inputs()),
                                                     qcfg, unclipped_first([float(p) for p in o["grid"]]),
                                                     o["coordinates"])
                entries = {n: searched.linears[n] for n in in_layers}
                meta["range_stream"] = "weights"
                meta["partition"] = [[i] for i in range(len(layers))]
                meta["percentiles"] = {n: {"a": chosen.get(n, 1.0), "w": 1.0} for n in in_layers}
                cost["search"] = time.perf_counter() - t0
            elif in_layers:
                inputs = part_inputs(model, "language", calib.inputs(), state=capture)
                # the searched layers' activation statistics: on the engine's weights stream
                # (round-to-nearest weights everywhere, activation quantizers off: the stream
                # every other row's ranges come from), or, as a control, the float stream
                act_stats = None
                if o["range_stream"] == "weights" and qcfg.quantizes_acts:
                    layer_of = {n: int(n[len(layers_path) + 1:].split(".", 1)[0]) for n in in_layers}
                    rtn_weights = QuantState(self.name, qcfg, {
                        n: linear_from_weight(m.weight, qcfg) for n, m in targets.items()})
                    act_stats = stream_stats(model, rtn_weights, layer_of, calib.inputs(), qcfg,
                                             [float(p) for p in o["grid"]], seed)
                meta["range_stream"] = o["range_stream"]
                masks = [m if m is not None else torch.ones(c.hidden.shape[:2], dtype=torch.bool)
                         for m, c in zip(inputs.masks, inputs.calls)]
                # 2. cross-layer dependency mining
                if self.use_cdm:
                    t0 = time.perf_counter()
                    bits = qcfg.a_bits if qcfg.quantizes_acts else int(o["cdm_bits"])
                    sym = qcfg.a_sym if qcfg.quantizes_acts else True
                    deps = mine_dependencies(layers, inputs.calls, masks, bits, sym,
                                             float(o["cdm_tau"]), int(o["cdm_samples"]), seed)
                    h0 = resolve_h0(deps, o["h0_rule"], o["h0"])
                    blocks = partition(deps, h0, int(o["max_block"]))
                    meta.update({"dependencies": deps, "h0": h0, "h0_rule": o["h0_rule"], "entropy_bits": bits})
                    cost["cdm"] = time.perf_counter() - t0
                else:
                    blocks = [[i] for i in range(len(layers))]
                meta["partition"] = blocks
                # 3. joint (or layer-wise) percentile search
                t0 = time.perf_counter()
                entries, summaries, percentiles = sequential_search(
                    model, inputs, in_layers, qcfg, blocks, [float(p) for p in o["grid"]],
                    joint=self.use_cdm, seed=seed, method=self.name,
                    coordinates=o["coordinates"], eval_batches=o["search_batches"],
                    search_weights=bool(o["search_weights"]),
                    exhaustive_max=int(o["exhaustive_max"]), act_stats=act_stats)
                cost["search"] = time.perf_counter() - t0
                meta["blocks"] = summaries
                meta["percentiles"] = percentiles
        finally:
            handle.restore()
        for n in targets:  # model order
            state.linears[n] = entries[n] if n in entries else other.linears[n]
        state.float_params = veo_params
        cost["total"] = time.perf_counter() - t_all
        meta["search_cost_s"] = {k: round(v, 3) for k, v in cost.items()}
        meta["summary"] = _summary(meta)
        return state


def _veo_summary(meta: dict) -> dict:
    veo = meta.get("veo") or {}
    summ: dict[str, Any] = {}
    for when in ("before", "after"):
        if veo.get(when):
            summ[f"veo_{when}"] = {k: round(v, 6) for k, v in veo[when].items()}
    if veo:
        summ["veo_steps"] = veo.get("steps")
    if veo.get("fallback"):
        summ["veo_fallback"] = veo["fallback"]
    return summ


def _summary(meta: dict) -> dict:
    """A few scalars for a record: partition, mean chosen percentiles, cost, error change."""
    blocks = meta.get("partition", [])
    pct = meta.get("percentiles", {})
    summ: dict[str, Any] = {
        "partition": "|".join("-".join(str(i) for i in (b[:1] + b[-1:] if len(b) > 1 else b))
                              for b in blocks),
        "n_blocks": len(blocks),
        "search_s": meta.get("search_cost_s", {}).get("total"),
    }
    if pct:
        summ["mean_p_w"] = round(sum(v["w"] for v in pct.values()) / len(pct), 5)
        summ["mean_p_a"] = round(sum(v["a"] for v in pct.values()) / len(pct), 5)
    if meta.get("blocks"):
        lw = sum(b["layerwise_error"] for b in meta["blocks"])
        bw = sum(b["block_error"] for b in meta["blocks"])
        summ["block_error_vs_layerwise"] = round(bw / lw, 5) if lw > 0 else None
        joint = [b for b in meta["blocks"] if "joint" in b.get("search", {})]
        summ["blocks_improved"] = sum(1 for b in joint if improves(b["block_error"], b["layerwise_error"]))
        summ["blocks_joint"] = len(joint)
    summ.update(_veo_summary(meta))
    return summ


@register_method
class QVLM(QVLMBase):
    name = "qvlm"
    summary = "Q-VLM: visual encoder optimization + cross-layer dependency mining with a joint block search"
    use_cdm, use_veo = True, True


@register_method
class QVLMCDM(QVLMBase):
    name = "qvlm-cdm"
    summary = "Q-VLM ablation: dependency mining + joint block search, no encoder optimization"
    use_cdm, use_veo = True, False


@register_method
class QVLMVEO(QVLMBase):
    name = "qvlm-veo"
    summary = "Q-VLM ablation: visual encoder optimization + layer-wise clipping search"
    use_cdm, use_veo = False, True


@register_method
class QVLMLayerwise(QVLMBase):
    name = "qvlm-layerwise"
    summary = "Q-VLM ablation baseline: layer-wise activation-clipping search only"
    use_cdm, use_veo = False, False


@register_method
class FP16VEO(Method):
    """The control: Q-VLM's VEO-tuned vision tower with the float language model.

    Nothing is quantized (``quantizes = False``): the state holds the tuned tower as
    ``float_params``. It runs once per scheme because VEO's objective (L_err, the Jacobian
    weights, the entropy grid) depends on the scheme. Compared with ``fp16`` it shows what VEO's
    supervised term (L_reg trains the tower on the calibration answers) does on its own, apart
    from quantization robustness.
    """

    name = "fp16+veo"
    summary = "control: Q-VLM's VEO-tuned vision tower with the float language model (no quantization)"
    needs_calibration = True
    quantizes: ClassVar[bool] = False
    defaults = VEO_DEFAULTS
    presets: ClassVar[dict[str, dict]] = {"fast": FAST_VEO}

    def quantize(self, lm, qcfg: QuantConfig, calib) -> QuantState:
        validate_veo(self.options)
        meta: dict[str, Any] = {"stages": {"veo": True, "cdm": False, "search": False},
                                "options": copy.deepcopy(self.options), "quantizes": False}
        state = QuantState(method=self.name, config=qcfg, meta=meta)
        if qcfg.is_float:
            return state
        if calib is None or not calib.batches:
            raise ValueError(f"{self.name} needs calibration data")
        params, seconds = run_veo(lm.model, qcfg, calib, self.options, meta)
        state.float_params = params
        meta["search_cost_s"] = {"veo": round(seconds, 3), "total": round(seconds, 3)}
        meta["summary"] = {"search_s": round(seconds, 3), **_veo_summary(meta)}
        return state
