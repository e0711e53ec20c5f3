"""The Q-VLM methods: the paper's method and its Table 1 ablations, one registered name each.

| name             | VEO | CDM + block search | search                       |
|------------------|-----|--------------------|------------------------------|
| ``qvlm``         | yes | yes                | block-wise in mined blocks   |
| ``qvlm-cdm``     | no  | yes                | block-wise in mined blocks   |
| ``qvlm-veo``     | yes | no                 | layer-wise                   |
| ``qvlm-layerwise`` | no | no                | layer-wise (the ablation's baseline) |

All four share one ``defaults`` dict, so one options block in a suite applies to every row of the
ablation; options a variant does not use are recorded but have no effect (``meta["stages"]``
says which stages ran). Pipeline: VEO (float vision encoder) -> CDM on the float model with the
optimized encoder -> sequential block search over the language layers, each block fed by the
already-quantized previous blocks (the shared loop ``harness.quant.blockwise``). Linears of other quantized parts (vision, projector, lm_head,
when the scheme's ``parts`` name them) get round-to-nearest at the config's clip. The state's
``meta`` holds the resolved options, the dependencies, h0, the partition, the chosen percentiles
and the search cost in seconds per stage.
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from typing import Any

import torch

from harness.models.layers import language_layers
from harness.quant.build import act_quantizer, linear_from_weight, target_linears
from harness.quant.config import QuantConfig
from harness.quant.blockwise import part_inputs
from harness.quant.simulated import apply_state
from harness.quant.state import QuantState
from harness.registry import Method, register_method

from .dependency import mine_dependencies, partition, resolve_h0
from .encoder import VEOConfig, optimize_vision_encoder
from .search import DEFAULT_GRID, sequential_search

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    # block search (§2)
    "grid": list(DEFAULT_GRID),  # clipping percentiles tried for every weight and activation quantizer
    "passes": 1,  # block-wise coordinate sweeps after the layer-wise initialization
    "coordinates": "group",  # a percentile pair per quantizer group, or "layer": one pair per layer
    "search_batches": None,  # calibration batches in the search objective (None: all)
    # dependency mining (§1)
    "max_block": 3,
    "h0": "median",  # threshold in nats, or "median" of the adjacent dependencies
    "cdm_tau": 0.01,  # soft-assignment temperature, code units squared (Eq. 5)
    "cdm_samples": 65536,  # activation positions sampled for the joint distribution
    "cdm_bits": 8,  # entropy grid when activations stay in float (else the scheme's a_bits)
    # visual encoder optimization (§3)
    "veo_epochs": 10,
    "veo_lr": 1e-5,
    "veo_optimizer": "adamw",
    "veo_weight_decay": 0.0,
    "veo_lambda1": 0.1,  # weight of L_ent
    "veo_lambda2": 1.0,  # weight of L_err
    "veo_eta": 1.0,  # weight of the final-output error inside L_err
    "veo_samples": 16384,  # positions per step for the differentiable entropy
    "veo_micro_batch": None,  # split each batch for memory (same gradient), None = whole batch
    "veo_jacobian_batches": None,  # batches for the Jacobian weights of L_ent (None: all)
    "veo_report": True,  # record the loss terms before/after on the calibration set (2 passes)
}


class QVLMBase(Method):
    """Shared implementation; subclasses pick the stages (not registered itself)."""

    use_cdm: bool = True
    use_veo: bool = True
    needs_calibration = True
    defaults = DEFAULTS

    def _validate(self) -> None:
        o = self.options
        grid = [float(p) for p in o["grid"]]
        if not grid or any(not 0 < p <= 1 for p in grid):
            raise ValueError(f"grid percentiles must lie in (0, 1], got {o['grid']}")
        if o["coordinates"] not in ("group", "layer"):
            raise ValueError(f"coordinates must be 'group' or 'layer', got {o['coordinates']!r}")
        if o["search_batches"] is not None and int(o["search_batches"]) < 1:
            raise ValueError("search_batches must be a positive number of batches or None")
        if int(o["max_block"]) < 1 or int(o["passes"]) < 0 or int(o["veo_epochs"]) < 0:
            raise ValueError("max_block must be >= 1, passes and veo_epochs >= 0")

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
        if self.use_veo and not any("pixel_values" in b for b in calib.batches):
            meta["veo_skipped"] = "calibration batches carry no images"
        elif self.use_veo and int(o["veo_epochs"]) > 0:
            t0 = time.perf_counter()
            cfg = VEOConfig(epochs=int(o["veo_epochs"]), lr=float(o["veo_lr"]),
                            optimizer=o["veo_optimizer"], weight_decay=float(o["veo_weight_decay"]),
                            lambda1=float(o["veo_lambda1"]), lambda2=float(o["veo_lambda2"]),
                            eta=float(o["veo_eta"]), tau=float(o["cdm_tau"]),
                            samples=int(o["veo_samples"]), micro_batch=o["veo_micro_batch"],
                            jacobian_batches=o["veo_jacobian_batches"], report=bool(o["veo_report"]),
                            seed=seed)
            veo_params, meta["veo"] = optimize_vision_encoder(model, qcfg, calib.batches, cfg)
            cost["veo"] = time.perf_counter() - t0

        handle = apply_state(model, QuantState(self.name, qcfg, float_params=veo_params))
        try:
            targets = target_linears(model, qcfg)
            layers_path, layers = language_layers(model)
            in_layers = {n: m for n, m in targets.items() if n.startswith(layers_path + ".")}
            other = QuantState(self.name, qcfg)
            for n, m in targets.items():
                if n not in in_layers:
                    other.linears[n] = linear_from_weight(m.weight, qcfg, act=act_quantizer(qcfg))
            # static ranges of these linears are the engine's (left unset); the language
            # layers' inputs are captured with their quantized weights, activations unquantized
            stream = QuantState(self.name, qcfg, {n: replace(lq, act=None) for n, lq in other.linears.items()})
            entries = {}
            if in_layers:
                inputs = part_inputs(model, "language", calib.inputs(),
                                     state=stream if stream.linears else None)
                masks = [m if m is not None else torch.ones(c.hidden.shape[:2], dtype=torch.bool)
                         for m, c in zip(inputs.masks, inputs.calls)]
                # 2. cross-layer dependency mining
                if self.use_cdm:
                    t0 = time.perf_counter()
                    bits = qcfg.a_bits if qcfg.quantizes_acts else int(o["cdm_bits"])
                    sym = qcfg.a_sym if qcfg.quantizes_acts else True
                    deps = mine_dependencies(layers, inputs.calls, masks, bits, sym,
                                             float(o["cdm_tau"]), int(o["cdm_samples"]), seed)
                    h0 = resolve_h0(deps, o["h0"])
                    blocks = partition(deps, h0, int(o["max_block"]))
                    meta.update({"dependencies": deps, "h0": h0, "entropy_bits": bits})
                    cost["cdm"] = time.perf_counter() - t0
                else:
                    blocks = [[i] for i in range(len(layers))]
                meta["partition"] = blocks
                # 3. block-wise (or layer-wise) percentile search
                t0 = time.perf_counter()
                entries, summaries, percentiles = sequential_search(
                    model, inputs, in_layers, qcfg, blocks, [float(p) for p in o["grid"]],
                    int(o["passes"]), self.use_cdm, seed, self.name, o["coordinates"],
                    o["search_batches"])
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
    return summ


@register_method
class QVLM(QVLMBase):
    name = "qvlm"
    summary = "Q-VLM: visual encoder optimization + cross-layer dependency mining with block-wise percentile search"
    use_cdm, use_veo = True, True


@register_method
class QVLMCDM(QVLMBase):
    name = "qvlm-cdm"
    summary = "Q-VLM ablation: dependency mining + block-wise percentile search, no encoder optimization"
    use_cdm, use_veo = True, False


@register_method
class QVLMVEO(QVLMBase):
    name = "qvlm-veo"
    summary = "Q-VLM ablation: visual encoder optimization + layer-wise percentile search"
    use_cdm, use_veo = False, True


@register_method
class QVLMLayerwise(QVLMBase):
    name = "qvlm-layerwise"
    summary = "Q-VLM ablation baseline: layer-wise clipping-percentile search only"
    use_cdm, use_veo = False, False
