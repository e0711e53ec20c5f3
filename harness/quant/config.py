"""``QuantConfig``: what to quantize and how, parsed from scheme strings such as ``w4a4``.

The scheme string fixes the two bit widths; every other choice has a default and an override,
and the fully resolved config is stored with every record so results stay comparable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass

from ..models.parts import PARTS

SCHEME_RE = re.compile(r"^w(\d+)a(\d+)$")
VALID_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
ACT_GRANULARITIES = ("per_token", "per_tensor")
COMMON_SCHEMES = ("w16a16", "w8a8", "w6a6", "w4a4", "w4a16", "w8a16", "w3a16", "w4a8")


class SchemeError(ValueError):
    """A scheme string or override is invalid; the message lists the valid choices."""


@dataclass(frozen=True)
class QuantConfig:
    """Resolved quantization settings. 16 bits means "left in floating point"."""

    w_bits: int = 16
    a_bits: int = 16
    w_sym: bool = False  # asymmetric weights, as GPTQ's and AWQ's defaults
    w_group_size: int | None = None  # None: one scale per output channel
    w_clip: float = 1.0
    a_sym: bool = True
    a_granularity: str = "per_token"  # dynamic per token, or a static calibrated per-tensor range
    a_clip: float = 1.0
    parts: tuple[str, ...] = ("language",)

    def __post_init__(self):
        for field_name in ("w_bits", "a_bits"):
            bits = getattr(self, field_name)
            if bits not in VALID_BITS:
                raise SchemeError(f"{field_name}={bits!r} is not supported; valid: {VALID_BITS}")
        if self.a_granularity not in ACT_GRANULARITIES:
            raise SchemeError(f"a_granularity={self.a_granularity!r}; valid: {ACT_GRANULARITIES}")
        bad = [p for p in self.parts if p not in PARTS]
        if bad:
            raise SchemeError(f"unknown model part(s) {bad}; valid: {list(PARTS)}")
        if self.w_group_size is not None and self.w_group_size <= 0:
            raise SchemeError(f"w_group_size must be positive or None, got {self.w_group_size}")
        for clip_name in ("w_clip", "a_clip"):
            clip = getattr(self, clip_name)
            if not 0 < clip <= 1:
                raise SchemeError(f"{clip_name} must be in (0, 1], got {clip}")

    @property
    def scheme(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}"

    @property
    def quantizes_weights(self) -> bool:
        return self.w_bits < 16

    @property
    def quantizes_acts(self) -> bool:
        return self.a_bits < 16

    @property
    def is_float(self) -> bool:
        return not (self.quantizes_weights or self.quantizes_acts)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["parts"] = list(self.parts)
        d["scheme"] = self.scheme
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        d = {k: v for k, v in d.items() if k != "scheme"}
        if "parts" in d:
            d["parts"] = tuple(d["parts"])
        return cls(**d)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


OVERRIDE_KEYS = tuple(f.name for f in dataclasses.fields(QuantConfig) if f.name not in ("w_bits", "a_bits"))


def parse_scheme(scheme: str, **overrides) -> QuantConfig:
    """``"w4a4"`` plus overrides (e.g. ``w_group_size=128, parts=["language", "vision"]``)."""
    m = SCHEME_RE.match(str(scheme).strip().lower())
    if not m:
        raise SchemeError(
            f"unknown scheme {scheme!r}: write w<bits>a<bits> with bits in {VALID_BITS}, "
            f"e.g. {', '.join(COMMON_SCHEMES)}"
        )
    bad = [k for k in overrides if k not in OVERRIDE_KEYS]
    if bad:
        raise SchemeError(f"unknown quantization override(s) {bad}; valid: {list(OVERRIDE_KEYS)}")
    if "parts" in overrides:
        parts = overrides["parts"]
        overrides["parts"] = (parts,) if isinstance(parts, str) else tuple(parts)
    return QuantConfig(w_bits=int(m.group(1)), a_bits=int(m.group(2)), **overrides)
