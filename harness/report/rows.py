"""Which records make which leaderboard row.

A row is (model, variant, scheme): the record's ``variant`` (fallback: ``method``) at a scheme,
its bits read by the one scheme parser (``harness.quant.config.parse_scheme``). Here: the row of a
record, the latest successful record per cell, the failures no later success replaced, and the
identity that joins a latency record to its accuracy row.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from ..quant.config import SchemeError, parse_scheme
from ..records import is_reference

ROW = ["model", "variant", "scheme"]


def variant_of(rec: dict) -> str:
    return rec.get("variant") or rec.get("method")


def scheme_bits(rec_or_scheme) -> tuple[int, int]:
    """(weight bits, activation bits) of a record (its quant_config) or of a scheme name like w4a8."""
    if isinstance(rec_or_scheme, dict):
        qc = rec_or_scheme.get("quant_config") or {}
        if qc.get("w_bits") and qc.get("a_bits"):
            return int(qc["w_bits"]), int(qc["a_bits"])
        rec_or_scheme = rec_or_scheme.get("scheme") or ""
    try:  # the one scheme parser (harness.quant.config), not a second regex
        cfg = parse_scheme(rec_or_scheme)
    except SchemeError:
        return 0, 0
    return cfg.w_bits, cfg.a_bits


def latest_ok(records: list[dict]) -> pd.DataFrame:
    """One row per (model, variant, scheme, task): the most recent successful record."""
    # latency/memory columns show the batch-1 workload with the default layouts; other batch sizes
    # and layouts chosen for one phase (``--objective decode|prefill``) stay in the perf tables
    rows = [r for r in records if r.get("status") == "ok"
            and not (r.get("metric") == "perf" and (r.get("batch_size") not in (None, 1)
                                                    or r.get("objective") not in (None, "generate")))]
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    df["variant"] = [variant_of(r) for r in rows]
    df["_ref"] = [is_reference(r) for r in rows]
    df["_control"] = [bool(r.get("control")) for r in rows]
    df["_order"] = range(len(df))
    df["task"] = df["task"].fillna("")
    if "metric" not in df:
        df["metric"] = None
    # the whole last record (groupby().last() would mix fields of different records around NaNs)
    return df.drop_duplicates(subset=ROW + ["task", "metric"], keep="last").sort_values("_order")


def record_field(rec: dict, key: str):
    """A record field from a DataFrame row: None where the record did not have it."""
    v = rec.get(key)
    return None if isinstance(v, float) and np.isnan(v) else v


def unresolved_failures(records: list[dict]) -> list[dict]:
    """Failed records whose cell has not succeeded since (a retried cell shows its result only)."""
    last: dict[tuple, dict] = {}
    for r in records:
        if r.get("status") in ("ok", "failed"):
            last[(r.get("model"), variant_of(r), r.get("scheme"), r.get("task") or "",
                  r.get("batch_size") if r.get("metric") == "perf" else None)] = r
    return [r for r in last.values() if r.get("status") == "failed"]


REFERENCE_ROW = "<reference>"


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _quant_identity(rec: dict) -> str | None:
    """The quantization settings of a record (its ``quant_config``), or None where it has none."""
    qc = rec.get("quant_config")
    if not isinstance(qc, dict) or not qc:
        return None
    return _json({k: v for k, v in qc.items() if k != "scheme"})


def _calibration_identity(rec: dict) -> str | None:
    """The calibration set a record's state was made with (task, split, n, seed, batch size,
    modality, data version: ``cells.calibration_spec``; ``kind: random`` for a perf row's random
    batches), or None where it got no data. The set's ``digest`` is left out: ``qvlm-bench perf``
    records it, the accuracy records do not, and it changes with the dtype the images were encoded
    in, not with the set."""
    cal = rec.get("calibration")
    if not isinstance(cal, dict) or not cal:
        return None
    return _json({k: v for k, v in cal.items() if k != "digest"})


def _ranges_identity(rec: dict) -> str | None:
    """The rule that filled the state's static activation ranges (stream, tokens, statistic:
    ``quant.ranges.rule_for``), without what filling them found (counts, percentiles)."""
    rule = rec.get("act_ranges")
    if not isinstance(rule, dict) or not rule:
        return None
    return _json({k: rule.get(k) for k in ("stream", "tokens", "stat")})


def row_identity(rec: dict) -> tuple:
    """What a latency row and an accuracy row must share to be joined, so that each is the same
    quantization state (but for the dtype and device it was made in): the model, the row label
    (``cells.Variant.label``, which names the method's non-default options and the clip lever; the
    float reference matches the reference whatever dtype it ran in), the scheme, the quantization
    settings behind the scheme (group size, symmetry, static or dynamic ranges), the calibration set
    and the rule that filled the static ranges (``qvlm-bench perf --methods-from SUITE`` makes its
    states with the suite's)."""
    ref = is_reference(rec)
    if ref:
        return (rec.get("model"), REFERENCE_ROW, rec.get("scheme"), None, None, None)
    return (rec.get("model"), variant_of(rec), rec.get("scheme"), _quant_identity(rec),
            _calibration_identity(rec), _ranges_identity(rec))
