"""The quantization state: everything a method decided, and nothing about how it will be executed.

A method returns a ``QuantState``; the simulated model (accuracy), the real-kernel model (latency,
memory) and the on-disk cache (resume) are all derived from it, so they cannot disagree.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import QuantConfig
from .quantizer import dequantize_weight

CHECKSUM_FILE = "checksum.json"  # written last: a folder without it was never finished
STATE_FILES = ("state.safetensors", "state.json")


class CorruptStateError(ValueError):
    """A cached state's bytes are not the ones that were saved (or were never finished)."""


def state_temp_name(key: str) -> str:
    """The folder a state is written in before its rename: hidden, unique per process and call, so
    two drivers saving one key never write into the same folder."""
    return f".{key}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"


def is_state_temp(name: str) -> bool:
    """A folder name ``state_temp_name`` makes (or the fixed ``<key>.tmp`` of older versions)."""
    return name.endswith(".tmp")


def state_key_of_temp(name: str) -> str:
    return name[1:].split(".")[0] if name.startswith(".") else name[: -len(".tmp")]


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
        """Write ``state.safetensors`` + ``state.json`` + their checksums into folder ``path``: built
        in a temporary folder of this call's own (two drivers saving one key never share it) and
        renamed when complete; a failure leaves nothing behind."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(state_temp_name(path.name))
        tmp.mkdir()
        try:
            self._write(tmp)
            _publish(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def _write(self, tmp: Path) -> None:
        """The state's files, then their checksums (last: a folder without them is unfinished)."""
        from safetensors.torch import save_file

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
        sums = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                for name in STATE_FILES}
        for name in STATE_FILES:  # the data is on disk before the checksum that vouches for it
            fd = os.open(tmp / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        with open(tmp / CHECKSUM_FILE, "w") as f:
            json.dump({"algorithm": "sha256", "files": sums}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def verify(path: str | Path) -> str | None:
        """None when the folder's files match the checksums written last by ``save``; otherwise
        what is wrong (missing checksum: never finished, or written before checksums existed)."""
        path = Path(path)
        try:
            sums = json.loads((path / CHECKSUM_FILE).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"no valid {CHECKSUM_FILE} (unfinished, or saved by an older version)"
        for name in STATE_FILES:
            f, want = path / name, sums.get(name) or {}
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != want.get("bytes"):
                return f"{name} has {f.stat().st_size} bytes, {want.get('bytes')} were saved"
            if _sha256(f) != want.get("sha256"):
                return f"{name} does not match its sha256 (the bytes changed after saving)"
        return None

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> "QuantState":
        """Read a saved state; with ``verify`` (the default) its checksums must match first
        (``CorruptStateError`` naming the file otherwise): a flipped byte must never become a
        silently wrong number."""
        from safetensors.torch import load_file

        path = Path(path)
        if verify:
            problem = cls.verify(path)
            if problem is not None:
                raise CorruptStateError(f"cached state {path}: {problem}")
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


def _publish(tmp: Path, path: Path) -> None:
    """Rename the finished ``tmp`` to ``path``, replacing an older folder there. If another writer
    published the same key in between (``rename`` onto a non-empty folder fails) and its copy
    verifies, ours is redundant and dropped."""
    if path.exists():
        old = path.with_name(state_temp_name(path.name))
        try:
            path.rename(old)
        except FileNotFoundError:
            pass
        else:
            shutil.rmtree(old, ignore_errors=True)
    try:
        tmp.rename(path)
    except OSError:
        if QuantState.verify(path) is not None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
