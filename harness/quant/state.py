"""The quantization state: everything a method decided, and nothing about how it will be executed.

A method returns a ``QuantState``; the simulated model (accuracy), the real-kernel model (latency,
memory) and the on-disk cache (resume) are all derived from it, so they cannot disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import QuantConfig
from .quantizer import dequantize_weight


@dataclass
class ActQuant:
    """An activation quantizer at a linear layer's input.

    ``per_token`` is dynamic (range of each token row at run time, shrunk by ``clip_ratio``);
    ``per_tensor`` is static, with ``scale``/``zero`` calibrated once.
    """

    bits: int
    sym: bool = True
    granularity: str = "per_token"
    clip_ratio: float = 1.0
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None

    def to_meta(self) -> dict:
        return {"bits": self.bits, "sym": self.sym, "granularity": self.granularity,
                "clip_ratio": float(self.clip_ratio)}


@dataclass
class LinearQuant:
    """One quantized linear layer: integer weight codes with scales and zero points per group.

    ``codes`` is ``None`` when weights stay in float (WxA-only-activation schemes); then ``weight``
    may carry a float replacement (for example AWQ's rescaled weight) or be ``None`` (unchanged).
    """

    bits: int
    codes: torch.Tensor | None = None  # uint8 [out, in], values in [0, 2**bits)
    scale: torch.Tensor | None = None  # float32 [out, n_groups]
    zero: torch.Tensor | None = None  # float32 [out, n_groups], integer valued
    group_size: int | None = None
    sym: bool = False
    act: ActQuant | None = None
    weight: torch.Tensor | None = None  # float weight override when codes is None
    # an online transform in front of the input quantizer ("hadamard": QuaRot's), folded into
    # the weight offline; harness.quant.transforms applies it
    input_transform: str | None = None

    def dequantized(self) -> torch.Tensor:
        """The float weight the simulated model computes with."""
        if self.codes is None:
            raise ValueError("this layer keeps float weights; it has no codes to dequantize")
        return dequantize_weight(self.codes, self.scale, self.zero)

    def max_codes_per_row(self, device=None) -> int:
        """Largest number of distinct codes in any output row: ≤ 2**bits proves the weights are
        quantized. ``device``: where to count (a GPU makes this ~free at 7B; on the CPU it took
        ~45 s per 7B state)."""
        if self.codes is None:
            return 0
        codes = self.codes if device is None else self.codes.to(device)
        seen = torch.zeros(codes.shape[0], 256, dtype=torch.bool, device=codes.device)
        seen.scatter_(1, codes.long(), True)
        return int(seen.sum(dim=1).max())


@dataclass
class QuantState:
    """A method's complete decision for one model and config.

    ``float_params`` are float tensors the method changed outside the quantized linears (AWQ's
    folded norm scales, Q-VLM's optimized vision encoder); ``meta`` holds method-specific
    findings (block partition, chosen percentiles, search cost, hyper-parameters) for records.
    """

    method: str
    config: QuantConfig
    linears: dict[str, LinearQuant] = field(default_factory=dict)
    float_params: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def proof(self, device=None) -> dict:
        """Evidence that quantization happened (docs/design.md: every record carries it).
        The engine computes it once per state (``meta["proof"]``); records copy it."""
        weights = [lq for lq in self.linears.values() if lq.codes is not None]
        acts = [lq for lq in self.linears.values() if lq.act is not None]
        return {
            "quantized_linears": len(weights),
            "act_quantizers": len(acts),
            "max_codes_per_row": max((lq.max_codes_per_row(device) for lq in weights), default=0),
            "weight_bits": sorted({lq.bits for lq in weights}),
        }

    # ---- persistence ------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write ``state.safetensors`` + ``state.json`` into folder ``path`` (atomically renamed)."""
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()

        def own(t: torch.Tensor) -> torch.Tensor:
            # safetensors refuses tensors that share memory (e.g. one static act range for the
            # q/k/v projections that read the same input): store a copy of the second one.
            t = t.detach().contiguous().cpu()
            if t.numel() and t.untyped_storage().data_ptr() in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            return t

        layers: dict[str, dict] = {}
        for name, lq in self.linears.items():
            entry = {"bits": lq.bits, "group_size": lq.group_size, "sym": lq.sym,
                     "act": lq.act.to_meta() if lq.act else None}
            if lq.input_transform is not None:
                entry["input_transform"] = lq.input_transform
            for key in ("codes", "scale", "zero", "weight"):
                t = getattr(lq, key)
                if t is not None:
                    tensors[f"linears/{name}/{key}"] = own(t)
            if lq.act is not None:
                for key in ("scale", "zero"):
                    t = getattr(lq.act, key)
                    if t is not None:
                        tensors[f"linears/{name}/act_{key}"] = own(t)
            layers[name] = entry
        for name, t in self.float_params.items():
            tensors[f"float/{name}"] = own(t)
        save_file(tensors, str(tmp / "state.safetensors"))
        meta = {"method": self.method, "config": self.config.to_dict(), "linears": layers,
                "float_params": list(self.float_params), "meta": self.meta}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=str))
        if path.exists():
            import shutil

            shutil.rmtree(path)
        tmp.rename(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "QuantState":
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
        linears = {}
        for name, entry in meta["linears"].items():
            get = lambda key: tensors.get(f"linears/{name}/{key}")  # noqa: E731
            act = None
            if entry["act"] is not None:
                act = ActQuant(**entry["act"], scale=get("act_scale"), zero=get("act_zero"))
            linears[name] = LinearQuant(bits=entry["bits"], codes=get("codes"), scale=get("scale"),
                                        zero=get("zero"), group_size=entry["group_size"],
                                        sym=entry["sym"], act=act, weight=get("weight"),
                                        input_transform=entry.get("input_transform"))
        float_params = {name: tensors[f"float/{name}"] for name in meta["float_params"]}
        return cls(method=meta["method"], config=QuantConfig.from_dict(meta["config"]),
                   linears=linears, float_params=float_params, meta=meta["meta"])
