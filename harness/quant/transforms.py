"""Float transforms that leave a model's function unchanged: per-channel scales and rotations.

Smoothing (SmoothQuant, AWQ) and rotation (QuaRot) methods move quantization difficulty around
with transforms that are exact in real arithmetic: a per-channel scale folded from a norm into
the linears that read it, an orthogonal matrix folded into every linear that reads or writes the
residual stream. ``FloatEdit`` builds such a transform as new values for model parameters
(computed in float64 — float32 for a half-precision model on a GPU — and stored in the
parameter's dtype) plus *online* transforms — an operation in
front of a linear's input quantizer that cannot be folded offline (QuaRot's Hadamard before
``down_proj``). An edit can then be

* put into a ``QuantState`` (``to_state``): ``float_params`` and each linear's
  ``input_transform``, which the simulated model (and the real-kernel engine) apply;
* applied to the model temporarily (``edited(model, edit)``), so that any quantizer — RTN, GPTQ,
  AWQ's search — runs on the transformed model unchanged (``quarot+gptq``).

Online transforms are registered as a linear's *first* forward pre-hook, so every statistic
taken through ``harness.quant.capture`` sees the quantizer's real input.

Hadamard matrices: Sylvester's for powers of two, times one Paley matrix (``q + 1`` for a prime
``q ≡ 3 mod 4``, ``2(q + 1)`` for a prime ``q ≡ 1 mod 4``) for other sizes, e.g. 768 = 12 · 64,
3584 = 28 · 128, 18944 = 148 · 128, 11008 = 5504 · 2 (QuaRot uses a tabulated 172 · 64 there; the
transform is as exact). Paley factors of order ``FFT_MIN_ORDER`` or more are applied by FFT
(their Jacobsthal core is circulant): a dense 5504² product costs more per token than the
7B ``down_proj`` it precedes, and ~40 s for the 4096 × 11008 weight on one CPU core (building
and checking the 5504² factor included; by FFT: ~5 s).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

import torch
from torch import nn

from ..models.family import ScaleGroup

ONLINE_TRANSFORMS = ("hadamard",)


# ---- Hadamard matrices ---------------------------------------------------------------------------

def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = χ(j − i)`` with χ the quadratic character mod the prime ``q``."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q).view(1, -1) - torch.arange(q).view(-1, 1)) % q
    return chi[idx]


def _paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``m`` by Paley's constructions, or None where they give none."""
    q = m - 1
    if q % 4 == 3 and _is_prime(q):  # Paley I: I + [[0, 1ᵀ], [−1, Q]]
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + s
    if m % 2 == 0:
        q = m // 2 - 1
        if q % 4 == 1 and _is_prime(q):  # Paley II: [[0, 1ᵀ], [1, Q]] with 2×2 blocks
            c = torch.zeros(m // 2, m // 2, dtype=torch.float64)
            c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
            zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
            one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            return torch.kron(c, one) + torch.kron((c == 0).double(), zero)
    return None


def _paley_kind(m: int) -> tuple[int, int] | None:
    """``(1, q)`` or ``(2, q)``: which of Paley's constructions gives order ``m`` (from the prime
    ``q``), or None (what ``_paley`` builds, without building it)."""
    if (m - 1) % 4 == 3 and _is_prime(m - 1):
        return 1, m - 1
    if m % 2 == 0 and (m // 2 - 1) % 4 == 1 and _is_prime(m // 2 - 1):
        return 2, m // 2 - 1
    return None


@lru_cache(maxsize=None)
def hadamard_factors(n: int) -> tuple[int, int]:
    """``(m, p)`` with ``n = m · p``, ``p`` a power of two and a Hadamard matrix of order ``m``
    known here (1, 2 or Paley), ``m`` as small as possible; ValueError where there is none."""
    if n < 1:
        raise ValueError(f"no Hadamard matrix of order {n}")
    for m in sorted(d for d in range(1, n + 1) if n % d == 0):
        p = n // m
        if p & (p - 1):
            continue
        if m in (1, 2) or _paley_kind(m) is not None:
            return m, p
    raise ValueError(f"no Hadamard matrix of order {n} from Sylvester × Paley constructions; "
                     "an online Hadamard needs one (use a size m·2^k with m−1 or m/2−1 prime)")


@lru_cache(maxsize=None)
def _dense_factor(m: int) -> torch.Tensor:
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    h = _paley(m)
    if h is None or not torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64)):
        raise ValueError(f"no Hadamard matrix of order {m}")
    return h


def has_hadamard(n: int) -> bool:
    try:
        hadamard_factors(n)
        return True
    except ValueError:
        return False


SYLVESTER_BLOCK = 64  # order of the dense Sylvester blocks _fwht multiplies by


@lru_cache(maxsize=None)
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh–Hadamard transform (Sylvester order) along the last dim.

    ``H_n = H_b1 ⊗ … ⊗ H_bk`` with dense Sylvester blocks of order ≤ ``SYLVESTER_BLOCK``: each
    step multiplies the fastest index digit by its block (one GEMM) and rotates it to the front,
    so after k steps every digit is done and back in place. Two GEMMs for n = 4096 instead of
    twelve passes over memory (measured 2.7 s instead of 10 s on an 11008 × 4096 float64 weight
    on one busy CPU core)."""
    n = x.shape[-1]
    blocks = []
    rest = n
    while rest > 1:
        blocks.append(min(SYLVESTER_BLOCK, rest))
        rest //= blocks[-1]
    shape = x.shape
    y = x.reshape(-1, n)
    rows = y.shape[0]
    for b in blocks:  # every block size divides what is left, so any order is the same H_n
        y = y.reshape(-1, b) @ _sylvester(b).to(device=x.device, dtype=x.dtype)
        y = y.reshape(rows, n // b, b).transpose(1, 2).reshape(rows, n)
    return y.reshape(shape)


FFT_MIN_ORDER = 64  # Paley factors of this order or more are applied by FFT, not densely


@lru_cache(maxsize=None)
def _chi_spectrum(q: int) -> torch.Tensor:
    """``rfft`` of the quadratic character mod ``q`` (the Jacobsthal matrix's first row)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    return torch.fft.rfft(chi)


def _paley_apply(z: torch.Tensor, m: int) -> torch.Tensor:
    """``z @ _paley(m)`` along the last dim in O(m log m): the Jacobsthal core ``Q[i, j] =
    χ(j − i)`` is circulant, so ``w @ Q`` is the circular convolution ``w ⊛ χ``, done by FFT
    (float64 for float64 inputs, else float32; exact up to the FFT's round-off)."""
    kind, q = _paley_kind(m)
    dtype = z.dtype
    z = z.to(torch.float64 if dtype == torch.float64 else torch.float32)
    spec = _chi_spectrum(q).to(device=z.device,
                               dtype=torch.complex128 if z.dtype == torch.float64 else torch.complex64)

    def core(v):  # [first, rest] @ [[0, 1ᵀ], [±1, Q]] without the sign of the first column
        rest = torch.fft.irfft(torch.fft.rfft(v[..., 1:], dim=-1) * spec, n=q, dim=-1)
        return v[..., 1:].sum(-1, keepdim=True), v[..., :1] + rest

    if kind == 1:  # H = I + [[0, 1ᵀ], [−1, Q]]
        first, rest = core(z)
        out = z + torch.cat((-first, rest), dim=-1)
    else:  # H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]], C = [[0, 1ᵀ], [1, Q]]
        zz = z.reshape(*z.shape[:-1], m // 2, 2).transpose(-1, -2)  # [..., 2, m/2]
        first, rest = core(zz)
        u = torch.cat((first, rest), dim=-1)  # (Z_s @ C) for s = 0, 1
        a, b = u[..., 0, :], u[..., 1, :]
        za, zb = zz[..., 0, :], zz[..., 1, :]
        out = torch.stack((a + b + za - zb, a - b - za - zb), dim=-1).reshape(z.shape)
    return out.to(dtype)


def apply_hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` along the last dim, ``H = (H_m ⊗ H_p) / √n`` orthogonal (``hadamard_factors``):
    a fast transform over the power-of-two factor, and over the other a small dense product
    or, from order ``FFT_MIN_ORDER`` on (11008 = 5504 · 2), Paley's circulant core by FFT."""
    n = x.shape[-1]
    m, p = hadamard_factors(n)
    y = _fwht(x.reshape(*x.shape[:-1], m, p))
    if m >= FFT_MIN_ORDER:
        y = _paley_apply(y.transpose(-1, -2), m).transpose(-1, -2)
    elif m > 1:
        hm = _dense_factor(m).to(device=x.device, dtype=x.dtype)
        y = torch.einsum("ik,...ij->...kj", hm, y)
    return (y / math.sqrt(n)).reshape(x.shape)


def hadamard_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """The orthogonal ``H`` that ``apply_hadamard`` multiplies by (dense; for tests and small n)."""
    return apply_hadamard(torch.eye(n, dtype=dtype)).contiguous()


def random_signs(n: int, seed: int) -> torch.Tensor:
    """±1 per channel from ``seed``: ``diag(signs) · H`` is QuaRot's randomized Hadamard."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1


def online(spec: str | None):
    """The function an ``input_transform`` spec stands for (None: identity)."""
    if spec is None:
        return None
    if spec == "hadamard":
        return apply_hadamard
    raise ValueError(f"unknown input transform {spec!r}; valid: {', '.join(ONLINE_TRANSFORMS)}")


ONLINE_ATTR = "online_input_transform"  # set on a module while an online transform hooks it


class OnlineHook:
    """Handle of ``add_online_hook``: ``remove()`` drops the hook and the module's mark."""

    def __init__(self, module: nn.Module, spec: str, handle):
        self.module, self.spec, self.handle = module, spec, handle

    def remove(self) -> None:
        self.handle.remove()
        if getattr(self.module, ONLINE_ATTR, None) == self.spec:
            delattr(self.module, ONLINE_ATTR)


def add_online_hook(module: nn.Module, spec: str) -> OnlineHook:
    """Register ``spec`` as ``module``'s first forward pre-hook (its quantizer sees the result)
    and mark the module with it (``online_transform_of``)."""
    fn = online(spec)
    if online_transform_of(module) is not None:
        raise ValueError(f"{type(module).__name__} already has an online input transform")

    def hook(_m, args):
        return (fn(args[0]),) + tuple(args[1:])
    handle = module.register_forward_pre_hook(hook, prepend=True)
    setattr(module, ONLINE_ATTR, spec)
    return OnlineHook(module, spec, handle)


def online_transform_of(module: nn.Module) -> str | None:
    """The online input transform hooked on ``module`` (by ``edited`` or ``apply_state``), or None.
    ``apply_state`` gives a linear's replacement the same transform, so a quantizer running
    inside ``edited`` (GPTQ applying the layers it has quantized) keeps the transformed stream."""
    return getattr(module, ONLINE_ATTR, None)


# ---- edits ---------------------------------------------------------------------------------------

class FloatEdit:
    """New values for a model's float parameters, built from exact transforms (module doc).

    Paths are full model paths. Every transform reads the current (already edited) value, so
    transforms compose in the order they are applied."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.params: dict[str, torch.Tensor] = {}  # float64 working copies
        self.online: dict[str, str] = {}  # linear path -> input transform spec

    def get(self, path: str) -> torch.Tensor:
        """The working copy: float64 on the CPU and for float64 models; float32 for a half-precision
        model on a GPU (its weights round 1e4× coarser than float32's, and float64 copies of a 7B
        model's weights would not fit beside it on an 80 GB card)."""
        if path not in self.params:
            p = self.model.get_parameter(path).detach()
            wide = p.dtype == torch.float64 or p.device.type == "cpu"
            self.params[path] = p.to(torch.float64 if wide else torch.float32).clone()
        return self.params[path]

    def has(self, path: str) -> bool:
        try:
            self.model.get_parameter(path)
            return True
        except AttributeError:
            return False

    def _bias(self, module_path: str) -> str | None:
        mod = self.model.get_submodule(module_path)
        return f"{module_path}.bias" if getattr(mod, "bias", None) is not None else None

    # -- per-channel scales
    def scale_group(self, prefix: str, group: ScaleGroup, s: torch.Tensor) -> None:
        """Fold ``s`` (one value per input channel of the group's linears): ``prev`` divided by
        it (a norm's weight and bias, or a linear's output rows and bias), the linears'
        columns multiplied by it. Exact: the linears' outputs do not change."""
        dot = f"{prefix}." if prefix else ""
        prev = f"{dot}{group.prev}"
        w = self.get(f"{prev}.weight")
        s = s.detach().to(w)  # the working copy's device and dtype
        self.params[f"{prev}.weight"] = w / (s.view(-1, 1) if w.dim() == 2 else s)
        bias = self._bias(prev)
        if bias is not None:
            self.params[bias] = self.get(bias) / s
        for lin in group.linears:
            path = f"{dot}{lin}.weight"
            self.params[path] = self.get(path) * s.view(1, -1)

    def fuse_norm(self, norm: str, readers: list[str]) -> None:
        """Move an RMSNorm's weight into the columns of the linears that read it; the norm's
        weight becomes ones (what a rotation of the residual stream needs)."""
        g = self.get(f"{norm}.weight")
        if self._bias(norm) is not None:
            raise ValueError(f"{norm} has a bias: only bias-free (RMS) norms fuse into their readers")
        for lin in readers:
            w = self.get(f"{lin}.weight")
            self.params[f"{lin}.weight"] = w * g.to(w).view(1, -1)
        self.params[f"{norm}.weight"] = torch.ones_like(g)

    # -- rotations: Q = diag(signs) · H, orthogonal
    def rotate_reader(self, linear: str, signs: torch.Tensor) -> None:
        """``W ← W Q`` for a linear that reads the rotated stream ``x Q``."""
        w = self.get(f"{linear}.weight")
        self.params[f"{linear}.weight"] = apply_hadamard(w * signs.to(w).view(1, -1))

    def rotate_writer(self, linear: str, signs: torch.Tensor) -> None:
        """``W ← Qᵀ W``, ``b ← Qᵀ b`` for a linear whose output joins the rotated stream."""
        w = self.get(f"{linear}.weight")
        signs = signs.to(w)
        self.params[f"{linear}.weight"] = apply_hadamard(w.T * signs.view(1, -1)).T.contiguous()
        bias = self._bias(linear)
        if bias is not None:
            self.params[bias] = apply_hadamard(self.get(bias) * signs)

    def rotate_embedding(self, path: str, signs: torch.Tensor) -> None:
        """``E ← E Q``: token embeddings enter the rotated stream."""
        e = self.get(f"{path}.weight")
        self.params[f"{path}.weight"] = apply_hadamard(e * signs.to(e).view(1, -1))

    def online_hadamard(self, linear: str) -> None:
        """``W ← W H`` and ``x ← x H`` online in front of the linear's quantizer (``H Hᵀ = I``)."""
        if linear in self.online:
            raise ValueError(f"{linear} already has an online transform")
        self.params[f"{linear}.weight"] = apply_hadamard(self.get(f"{linear}.weight"))
        self.online[linear] = "hadamard"

    # -- results
    def cast(self) -> dict[str, torch.Tensor]:
        """The edited parameters in their own dtypes and devices."""
        out = {}
        for path, value in self.params.items():
            p = self.model.get_parameter(path)
            out[path] = value.to(device=p.device, dtype=p.dtype)
        return out

    def to_state(self, state) -> None:
        """Put the edit into ``state``: online transforms on its linear entries, and every edited
        parameter as a float param, except the weights of linears that carry codes (their codes
        were made from the edited weight)."""
        from .state import LinearQuant

        for linear, spec in self.online.items():
            lq = state.linears.get(linear)
            if lq is None:
                lq = state.linears[linear] = LinearQuant(bits=16)
            lq.input_transform = spec
        for path, value in self.cast().items():
            owner, _, leaf = path.rpartition(".")
            lq = state.linears.get(owner)
            if leaf == "weight" and lq is not None and (lq.codes is not None or lq.weight is not None):
                continue
            state.float_params[path] = value.detach().cpu()


@contextmanager
def edited(model: nn.Module, edit: FloatEdit) -> Iterator[nn.Module]:
    """The model computing with ``edit`` inside the block (parameters written in place, online
    transforms as first pre-hooks), restored on exit."""
    saved: dict[str, torch.Tensor] = {}
    handles = []
    try:
        with torch.no_grad():
            for path, value in edit.cast().items():
                p = model.get_parameter(path)
                saved[path] = p.detach().clone()
                p.copy_(value)
        for linear, spec in edit.online.items():
            handles.append(add_online_hook(model.get_submodule(linear), spec))
        yield model
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for path, value in saved.items():
                model.get_parameter(path).copy_(value)
