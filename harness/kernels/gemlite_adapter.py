"""gemlite (pip ``gemlite``, optional extra ``perf``): Triton low-bit matmuls fed with our codes.

Facts about gemlite 0.6 this adapter relies on (read from its source):

* ``GemLiteLinearTriton(W_nbits, group_size, in_features, out_features, input_dtype,
  output_dtype, scaled_activations)`` then ``.pack(W_q uint8 [N, K], scales [N, G], zeros [N, G],
  fma_mode=False)`` packs unsigned codes (``W_nbits`` 4 or 8; our 3-bit codes fit 4, 5..7-bit
  codes fit 8) into int32 words along K. With ``fma_mode=False`` a group dequantizes as
  ``(q - zeros) * scales`` in the scales' dtype (``W_group_mode`` 3): the simulated model's
  ``(q - z) * s`` with ``s`` rounded to the activation dtype. For one group per row (per-channel)
  ``pack`` picks the post-scaled mode; setting ``W_group_mode = 3, channel_scale_mode = 0``
  afterwards keeps the in-loop dequantization (as gemlite's own ``A16Wn(post_scale=False)``).
* ``forward`` picks GEMV (1-4 rows), split-K GEMM (up to 63) or GEMM by the number of rows.
* FP8 activations (``input_dtype`` FP8 e4m3, ``scaled_activations=True``) with
  ``W_group_mode = 1`` (shift: ``q - zeros``) and ``channel_scale_mode = 3`` multiply the
  float32 accumulator by ``scales_x[m] * scales[n]`` in the epilogue. ``forward`` would quantize
  the activations itself; ``gemm.forward`` takes FP8 codes and ``scales_x [M, 1]`` directly, so
  the codes come from our fused quantizer (4-bit codes minus zero, exact in e4m3).
* Importing gemlite needs a CUDA device (it reads the device's properties at import).
* gemlite ships autotuned configurations per GPU (``gemlite/configs/*.json``), keyed by
  ``(rows bucket, N, K, group, codes per word, type id)``; an H200 gets none by name, and H100's
  (same SM 9.0 chip, same 132 SMs) are loaded for it. Its kernels take N and K as compile-time
  constants, so autotuning a shape compiles every candidate configuration (~20 per kernel type):
  minutes for a perf run. Shapes that the file lacks (our fused q/k/v and gate/up widths,
  per-channel groups) therefore borrow the configurations of the nearest tuned shape of the same
  kind (``seed_configs``), one compile per shape; the layer's notes say which.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

FP8 = getattr(torch, "float8_e4m3fn", None)


def installed() -> bool:
    return importlib.util.find_spec("gemlite") is not None


@functools.lru_cache(maxsize=1)
def _module():
    import gemlite

    try:  # no tuned configs for this card's name: borrow the nearest (see the module docstring)
        name = torch.cuda.get_device_properties(0).name.lower()
        if "h200" in name:
            cfg = Path(gemlite.__file__).parent / "configs" / "h100.json"
            if cfg.exists():
                gemlite.load_config(str(cfg), print_error=False)
    except Exception:  # noqa: BLE001 - tuning only
        pass
    return gemlite


_SEEDED: dict = {}


def borrow_configs(cache: dict, n: int, k: int, group: int, per_word: int, type_id: int,
                   like_type: int | None = None) -> list[str]:
    """Add to gemlite's config ``cache`` (matmul type -> signature string -> config) entries for
    ``(rows, n, k, group, per_word, type_id)`` copied from the nearest tuned shape with the same
    ``per_word`` and type (``like_type``, default ``type_id``; same group preferred, then 128;
    nearest N and K in log scale), for every rows bucket it was tuned at. Returns
    ``"<matmul type> from (N, K, group[, type])"`` lines."""
    import ast
    import math

    src_type = type_id if like_type is None else like_type
    borrowed = []
    for mt, table in cache.items():
        same = [ast.literal_eval(sig) for sig in table]
        same = [sig for sig in same if sig[4] == per_word and sig[5] == src_type]
        if not same:
            continue

        def dist(sig):
            g_pen = 0 if sig[3] == group else 1 if sig[3] == 128 else 2
            return (g_pen, abs(math.log(sig[1] / n)) + abs(math.log(sig[2] / k)))
        best = min(same, key=dist)
        if best[1:4] == (n, k, group) and src_type == type_id:
            continue
        for sig in same:
            if sig[1:4] == best[1:4]:
                table.setdefault(str((sig[0], n, k, group, per_word, type_id)), dict(table[str(sig)]))
        borrowed.append(f"{mt} from {best[1:4]}" + (f" type {src_type}" if src_type != type_id else ""))
    return borrowed


def seed_configs(n: int, k: int, group: int, per_word: int, type_id: int,
                 like_type: int | None = None) -> str | None:
    """``borrow_configs`` on gemlite's loaded cache, once per shape; what was borrowed, or None."""
    from gemlite import core

    key = (n, k, group, per_word, type_id, like_type)
    if key not in _SEEDED:
        _SEEDED[key] = "; ".join(borrow_configs(core.GEMLITE_TRITON_CONFIG_CACHE, *key)) or None
    return _SEEDED[key]


def version() -> str | None:
    if not installed():
        return None
    from importlib.metadata import version as v

    return v("gemlite")


def usable(bits: int, in_features: int, group: int, dtype: torch.dtype, device) -> str | None:
    """None when gemlite can run this layer here, else why not."""
    if not str(device).startswith("cuda"):
        return "gemlite runs on CUDA only"
    if not installed():
        return "gemlite is not installed (pip install 'qvlm-bench[perf]')"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"gemlite takes fp16/bf16 activations, not {dtype}"
    if bits > 8:
        return "more than 8 bits"
    if in_features % 32 or in_features % group or group < 16:
        return f"in_features {in_features} / group {group}: gemlite needs K % 32 == 0 and groups >= 16"
    return None


def _dtype_enum(dtype: torch.dtype):
    from gemlite.dtypes import TORCH_TO_DTYPE

    return TORCH_TO_DTYPE[dtype]


def build(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype):
    """A GemLite layer for uint8 ``codes [N, K]``, ``scale``/``zero [N, G]`` (float, integer zeros)."""
    _module()
    from gemlite.core import GemLiteLinearTriton

    n, k = codes.shape
    g = scale.shape[1]
    nbits = 4 if bits <= 4 else 8
    layer = GemLiteLinearTriton(nbits, group_size=k // g, in_features=k, out_features=n,
                                input_dtype=_dtype_enum(dtype), output_dtype=_dtype_enum(dtype))
    layer.pack(codes.contiguous(), scale.to(dtype).contiguous(), zero.to(dtype).contiguous(), bias=None,
               fma_mode=False)
    layer.W_group_mode, layer.channel_scale_mode = 3, 0  # (q - z) * s inside the loop, every group
    meta = layer.get_meta_args()
    type_id = (1 if dtype in (torch.float16, torch.bfloat16) else meta[5]) * 100 + meta[1]  # bf16 tunes as fp16
    layer.borrowed_configs = seed_configs(n, k, layer.group_size, layer.elements_per_sample, type_id)
    return layer


def build_fp8(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype,
              share_with=None):
    """The FP8-activation GEMM layer of per-channel 4-bit ``codes`` (scales applied in the epilogue).

    ``share_with``: a layer from ``build`` of the same codes; its packed words are reused."""
    _module()
    from gemlite.core import GemLiteLinearTriton

    n, k = codes.shape
    if scale.shape[1] != 1:
        raise ValueError("the FP8 path needs per-channel weight scales")
    layer = GemLiteLinearTriton(4, group_size=k, in_features=k, out_features=n,
                                input_dtype=_dtype_enum(FP8), output_dtype=_dtype_enum(dtype),
                                scaled_activations=True)
    layer.pack(codes.contiguous(), scale.float().contiguous(), zero.float().contiguous(), bias=None,
               fma_mode=False)
    layer.W_group_mode, layer.channel_scale_mode = 1, 3  # q - z in the loop; s_x * s_w after it
    meta = layer.get_meta_args()
    # no tuned FP8-activation W4 shapes ship: borrow the fp16 W4 GEMM tiles (BLOCK_K >= 32 there)
    layer.borrowed_configs = seed_configs(n, k, layer.group_size, layer.elements_per_sample,
                                          meta[5] * 100 + meta[1], like_type=104)
    if share_with is not None and share_with.W_q.shape == layer.W_q.shape \
            and share_with.W_q.dtype == layer.W_q.dtype:
        layer._promote_to_parameter("W_q", share_with.W_q.data)
    return layer


def matmul(layer, x: torch.Tensor) -> torch.Tensor:
    return layer.forward(x.contiguous())


def matmul_fp8(layer, x: torch.Tensor, scale_x: torch.Tensor) -> torch.Tensor:
    """A ``build_fp8`` layer on activation codes the engine already made: ``x [M, K]`` e4m3 holding
    integer values, ``scale_x`` per row. gemlite's own forward would quantize ``x`` again (per token,
    to the full e4m3 range), so its GEMM is called the way that forward calls it, with our scales:
    ``y = (scale_x[m] * scale_w[n]) * sum_k x[m, k] * (q[n, k] - z[n])`` (``channel_scale_mode`` 3)."""
    _module()
    from gemlite.core import GEMLITE_TRITON_MAPPING

    meta = layer.get_meta_args()
    w_q, scales, zeros, meta_scale = layer.get_tensor_args()
    type_id = meta[5] * 100 + meta[1]  # gemlite's autotune key: input dtype and weight bits
    sx = scale_x.reshape(-1, 1).to(torch.float32).contiguous()
    # forward_functional passes bool(meta[1]) as data_contiguous; the same here
    return GEMLITE_TRITON_MAPPING["GEMM"].forward(x.contiguous(), w_q, scales, zeros, sx, *meta[1:-1],
                                                  bool(meta[1]), type_id, meta_scale=meta_scale)


def dequant_kn(wq: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, nbits: int, per_word: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The weight a ``build`` layer computes with, as ``[K, N]`` in ``dtype``, from its own tensors.

    gemlite's layout (``pack_weights_over_cols``, transposed and made contiguous): word
    ``wq[r, n]`` holds codes ``k = r * per_word + j`` of column ``n`` at bit ``j * nbits``;
    ``scales`` / ``zeros`` are ``[G, N]``; ``W_group_mode`` 3 dequantizes ``(q - zeros) * scales`` in
    the scales' dtype, which is what this returns, so ``x @ dequant_kn(...)`` is gemlite's product up
    to the matmul's own rounding. Written for inductor to fuse into one pass (the prefill path of
    this layout: dequantize once, then cuBLAS, instead of gemlite's GEMM)."""
    words, n = wq.shape
    wide = torch.int64 if wq.element_size() == 8 else torch.int32
    shifts = torch.arange(per_word, device=wq.device, dtype=wide) * nbits
    q = (wq.to(wide)[:, None, :] >> shifts[None, :, None]) & ((1 << nbits) - 1)
    g = scales.shape[0]
    q = q.reshape(g, words * per_word // g, n).to(dtype)
    w = (q - zeros.to(dtype)[:, None, :]) * scales.to(dtype)[:, None, :]
    return w.reshape(words * per_word, n)


def dequant_args(layer) -> tuple:
    """``dequant_kn``'s tensors and sizes for a ``build`` layer (``W_group_mode`` 3)."""
    if layer.W_group_mode != 3:
        raise ValueError(f"dequantizing gemlite's W_group_mode {layer.W_group_mode} is not implemented")
    return layer.W_q, layer.scales, layer.zeros, int(layer.W_nbits), int(layer.elements_per_sample)
