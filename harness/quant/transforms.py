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

Hadamard matrices: Sylvester's for powers of two, times one Paley matrix over the finite field
GF(q), ``q`` a prime power (Paley I: order ``q + 1`` for ``q ≡ 3 mod 4``; Paley II: ``2(q + 1)`` for
``q ≡ 1 mod 4``), the smallest such factor a width allows: 768 = 12 · 64, 3584 = 28 · 128,
18944 = 148 · 128 (GF(73)), 11008 = 344 · 32 (GF(7³); over prime fields alone it was 5504 · 2,
and the paper's tabulated 172 · 64 is no Paley order). The online transform then costs ``m``
multiply-adds per element for the dense ``m × m`` factor (344 at 11008: 3.8 M per token row, a
twelfth of the 7B ``down_proj``, instead of 61 M) plus ``log2 p`` additions. Factors of order
``FFT_MIN_ORDER`` or more (widths with no smaller one) are applied by FFT: their Jacobsthal core
is a convolution over GF(q)'s additive group.
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


# ---- finite fields and Paley matrices -----------------------------------------------------------

def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q = p^k``, ``p`` prime, ``k ≥ 1``; None where ``q`` is no prime power."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)  # the smallest prime factor
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_rem(a: list[int], f: list[int], p: int) -> list[int]:
    """``a mod f`` over GF(p), polynomials as coefficient lists (lowest degree first), ``f``
    monic; the remainder padded to ``deg f`` coefficients."""
    a, d = list(a), len(f) - 1
    for top in range(len(a) - 1, d - 1, -1):
        c = a[top] % p
        if c:
            for i in range(d + 1):
                a[top - d + i] = (a[top - d + i] - c * f[i]) % p
    return [c % p for c in a[:d]] + [0] * max(0, d - len(a))


def _monic(code: int, d: int, p: int) -> list[int]:
    """The monic polynomial of degree ``d`` over GF(p) whose lower coefficients are the base-``p``
    digits of ``code`` (lowest degree first)."""
    return [(code // p ** i) % p for i in range(d)] + [1]


@lru_cache(maxsize=None)
def _irreducible(p: int, k: int) -> tuple[int, ...]:
    """The lower coefficients ``(c_0, …, c_{k−1})`` of a monic irreducible polynomial
    ``x^k + c_{k−1}x^{k−1} + … + c_0`` over GF(p), found by search: the first in the order of
    ``Σ c_i p^i`` that no monic polynomial of degree 1 … k/2 divides (``x`` for ``k = 1``, so
    that GF(p) is the integers mod p)."""
    if k == 1:
        return (0,)
    for code in range(1, p ** k):
        f = _monic(code, k, p)
        if f[0] and all(any(_poly_rem(f, _monic(g, d, p), p))
                        for d in range(1, k // 2 + 1) for g in range(p ** d)):
            return tuple(f[:k])
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # there is one


@lru_cache(maxsize=None)
def _quadratic_character(q: int) -> tuple[int, ...]:
    """``χ(a)`` for the elements ``a = 0 … q−1`` of GF(q), ``q = p^k`` an odd prime power: 0 at 0,
    else ``a^((q−1)/2)``, which is ±1 (1 on the nonzero squares). Element ``a`` is the polynomial
    ``Σ a_i x^i`` (``a_i`` its base-``p`` digits) modulo ``_irreducible(p, k)``: addition is
    digit-wise mod p, and GF(p) (``k = 1``) the integers mod p."""
    p, k = _prime_power(q)
    e = (q - 1) // 2
    if k == 1:
        return (0,) + tuple(1 if pow(a, e, p) == 1 else -1 for a in range(1, q))
    f = list(_irreducible(p, k)) + [1]

    def mul(a, b):
        prod = [0] * (2 * k - 1)
        for i, ai in enumerate(a):
            if ai:
                for j, bj in enumerate(b):
                    prod[i + j] += ai * bj
        return _poly_rem(prod, f, p)

    one, minus_one = [1] + [0] * (k - 1), [p - 1] + [0] * (k - 1)
    chi = [0]
    for a in range(1, q):
        base, r, n = [(a // p ** i) % p for i in range(k)], one, e
        while n:  # square and multiply
            if n & 1:
                r = mul(r, base)
            base, n = mul(base, base), n >> 1
        if r not in (one, minus_one):
            raise AssertionError(f"a^((q-1)/2) = {r} in GF({q}): not a field")
        chi.append(1 if r == one else -1)
    return tuple(chi)


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = χ(a_j − a_i)`` over GF(q) (int64), ``a_i`` the ``i``-th element
    (``_quadratic_character``); circulant for a prime ``q``."""
    p, k = _prime_power(q)
    chi = torch.tensor(_quadratic_character(q), dtype=torch.int64)
    a = torch.arange(q)
    idx = torch.zeros(q, q, dtype=torch.int64)
    for i in range(k):  # a_j − a_i digit by digit
        d = (a // p ** i) % p
        idx += ((d.view(1, -1) - d.view(-1, 1)) % p) * p ** i
    return chi[idx]


def _paley_kind(m: int) -> tuple[int, int] | None:
    """``(1, q)`` (Paley I: ``m = q + 1``, ``q ≡ 3 mod 4``) or ``(2, q)`` (Paley II:
    ``m = 2(q + 1)``, ``q ≡ 1 mod 4``) for the prime power ``q`` that gives order ``m``, or None
    (what ``_paley`` builds, without building it). Where both apply, a prime ``q`` first (the
    matrices this code built before it knew prime powers: 28 stays Paley II over GF(13), not
    Paley I over GF(27)), then Paley I."""
    found = []
    if (m - 1) % 4 == 3 and _prime_power(m - 1):
        found.append((1, m - 1))
    if m % 2 == 0 and (m // 2 - 1) % 4 == 1 and _prime_power(m // 2 - 1):
        found.append((2, m // 2 - 1))
    found.sort(key=lambda kq: not _is_prime(kq[1]))  # stable: Paley I before II within a class
    return found[0] if found else None


def _paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``m`` (int64, entries ±1) by Paley's constructions over GF(q)
    (``_paley_kind``), or None where they give none."""
    kind_q = _paley_kind(m)
    if kind_q is None:
        return None
    kind, q = kind_q
    if kind == 1:  # I + [[0, 1ᵀ], [−1, Q]], Q antisymmetric (χ(−1) = −1)
        s = torch.zeros(m, m, dtype=torch.int64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return torch.eye(m, dtype=torch.int64) + s
    # Paley II: C = [[0, 1ᵀ], [1, Q]] (Q symmetric); each 0 of C becomes [[1, −1], [−1, −1]],
    # each ±1 becomes ±[[1, 1], [1, −1]]
    c = torch.zeros(m // 2, m // 2, dtype=torch.int64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    zero = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    one = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    return torch.kron(c, one) + torch.kron((c == 0).long(), zero)


# ---- Hadamard matrices ---------------------------------------------------------------------------

def _builds(m: int) -> bool:
    """Whether ``_hadamard_int`` builds an order ``m`` (1, 2 or a Paley order)."""
    return m in (1, 2) or _paley_kind(m) is not None


def _factors(n: int) -> tuple[int, int] | None:
    """``hadamard_factors(n)``, or None where there are none."""
    odd, k = n, 0
    while odd % 2 == 0:
        odd, k = odd // 2, k + 1
    for j in range(k + 1):  # m = odd · 2^j, smallest first
        if _builds(odd << j):
            return odd << j, n // (odd << j)
    return None


@lru_cache(maxsize=None)
def hadamard_factors(n: int) -> tuple[int, int]:
    """``(m, p)`` with ``n = m · p``, ``p`` a power of two and a Hadamard matrix of order ``m``
    built here (1, 2 or Paley over GF(q), ``q`` a prime power), ``m`` as small as possible:
    the dense (or FFT) part of ``apply_hadamard`` costs ``m`` multiply-adds per element, the
    Sylvester part ``log2 p`` additions (11008 = 344 · 32, GF(7³)). ValueError where there is
    none, naming the orders it needs and those built here, and the nearest widths with one."""
    if n < 1:
        raise ValueError(f"no Hadamard matrix of order {n}")
    found = _factors(n)
    if found is not None:
        return found
    odd = n // (n & -n)
    needs = ", ".join(str(odd << j) for j in range((n // odd).bit_length()))
    orders = ", ".join(str(m) for m in range(1, 101)  # those no smaller order · 2^i gives
                       if _builds(m)
                       and not any(_builds(m >> i) for i in range(1, (m & -m).bit_length())))

    def cheap(w):  # a width with a factor of order ≤ NEAR_ORDER (1 is, and every power of two)
        f = _factors(w)
        return f is not None and f[0] <= NEAR_ORDER
    near = [next(w for w in range(n - 1, 0, -1) if cheap(w)),
            next(w for w in range(n + 1, 2 * n) if cheap(w))]
    raise ValueError(
        f"no Hadamard matrix of order {n} = {odd}·{n // odd} from Sylvester × Paley constructions "
        f"(an online Hadamard needs one): it needs one of order {needs}; built here are 2^k times "
        f"{orders}, … (1, 2, q + 1 for a prime power q ≡ 3 mod 4, 2(q + 1) for a prime power "
        f"q ≡ 1 mod 4); nearest widths with one of order ≤ {NEAR_ORDER} times 2^k: "
        + ", ".join(f"{w} = {_factors(w)[0]}·{_factors(w)[1]}" for w in near))


NEAR_ORDER = 256  # hadamard_factors' error names the nearest widths with a factor at most this big


@lru_cache(maxsize=None)
def _hadamard_int(m: int) -> torch.Tensor:
    """The Hadamard matrix of order ``m`` (1, 2 or ``_paley(m)``, int64), checked: ``H Hᵀ = m I``
    (in float64 for speed, exact here: every entry and partial sum is an integer below 2^53)."""
    if m == 1:
        h = torch.ones(1, 1, dtype=torch.int64)
    elif m == 2:
        h = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    else:
        h = _paley(m)
    if h is None or not torch.equal((h.double() @ h.double().T).long(),
                                    m * torch.eye(m, dtype=torch.int64)):
        raise ValueError(f"no Hadamard matrix of order {m}")
    return h


@lru_cache(maxsize=None)
def _dense_factor(m: int) -> torch.Tensor:
    return _hadamard_int(m).double()


def has_hadamard(n: int) -> bool:
    return n >= 1 and _factors(n) is not None


SYLVESTER_BLOCK = 64  # order of the dense Sylvester blocks _fwht multiplies by


@lru_cache(maxsize=None)
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def _sylvester_on(b: int, device, dtype) -> torch.Tensor:
    return _sylvester(b).to(device=device, dtype=dtype)


def _fwht(x: torch.Tensor, block=_sylvester_on) -> torch.Tensor:
    """Unnormalized Walsh–Hadamard transform (Sylvester order) along the last dim.

    ``H_n = H_b1 ⊗ … ⊗ H_bk`` with dense Sylvester blocks of order ≤ ``SYLVESTER_BLOCK``: each
    step multiplies the fastest index digit by its block (one GEMM) and rotates it to the front,
    so after k steps every digit is done and back in place. Two GEMMs for n = 4096 instead of
    twelve passes over memory (measured 2.7 s instead of 10 s on an 11008 × 4096 float64 weight
    on one busy CPU core). ``block(b, device, dtype)`` gives the Sylvester block: by default copied
    from the host, which the real-kernel engine avoids (its own cached blocks: a CUDA graph cannot
    capture a host copy)."""
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
        y = y.reshape(-1, b) @ block(b, x.device, x.dtype)
        y = y.reshape(rows, n // b, b).transpose(1, 2).reshape(rows, n)
    return y.reshape(shape)


# Paley factors of this order or more are applied by FFT, smaller ones densely: on one CPU core
# (float32, benchmarks/bench_online_hadamard.py) the dense product is 2-10× faster up to order
# 500, as fast at 924 and 3× slower at 1332; on a GPU a dense GEMM of these sizes is cheaper still.
FFT_MIN_ORDER = 1024


@lru_cache(maxsize=None)
def _chi_spectrum(q: int) -> torch.Tensor:
    """``rfftn`` of the quadratic character of GF(q) (the Jacobsthal matrix's first row) on the
    grid ``(p,) * k`` of the additive group ``(Z_p)^k`` (``q = p^k``; one axis per base-p digit)."""
    p, k = _prime_power(q)
    chi = torch.tensor(_quadratic_character(q), dtype=torch.float64).reshape((p,) * k)
    return torch.fft.rfftn(chi)


def _paley_apply(z: torch.Tensor, m: int) -> torch.Tensor:
    """``z @ _paley(m)`` along the last dim in O(m log m): ``Q[i, j] = χ(a_j − a_i)`` depends on
    a difference in the additive group ``(Z_p)^k`` of GF(p^k), so ``w @ Q`` is the convolution
    ``w ⊛ χ`` over that group, done by a k-dimensional FFT (circular, one axis per base-p digit;
    one axis for a prime q). Float64 for float64 inputs, else float32; exact up to the FFT's
    round-off."""
    kind, q = _paley_kind(m)
    p, k = _prime_power(q)
    grid, dims = (p,) * k, tuple(range(-k, 0))
    dtype = z.dtype
    z = z.to(torch.float64 if dtype == torch.float64 else torch.float32)
    cdtype = torch.complex128 if z.dtype == torch.float64 else torch.complex64
    spec = _chi_spectrum(q).to(device=z.device, dtype=cdtype)

    def core(v):  # [first, rest] @ [[0, 1ᵀ], [±1, Q]] without the sign of the first column
        w = v[..., 1:].reshape(*v.shape[:-1], *grid)
        rest = torch.fft.irfftn(torch.fft.rfftn(w, dim=dims) * spec, s=grid, dim=dims)
        return v[..., 1:].sum(-1, keepdim=True), v[..., :1] + rest.reshape(*v.shape[:-1], q)

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


def _apply_factored(x: torch.Tensor, m: int, p: int, fft: bool | None = None) -> torch.Tensor:
    """``x @ (H_m ⊗ H_p) / √(m p)`` along the last dim (width ``m · p``): Sylvester's ``H_p`` by
    ``_fwht``, ``H_m`` by a dense product or (``fft``; default: from order ``FFT_MIN_ORDER`` on)
    Paley's core by FFT. ``apply_hadamard`` with ``hadamard_factors``' ``(m, p)``; other
    factorizations only for comparisons (benchmarks/bench_online_hadamard.py)."""
    n = x.shape[-1]
    if n != m * p:
        raise ValueError(f"width {n} is not {m}·{p}")
    y = _fwht(x.reshape(*x.shape[:-1], m, p))
    if fft if fft is not None else m >= FFT_MIN_ORDER:
        y = _paley_apply(y.transpose(-1, -2), m).transpose(-1, -2)
    elif m > 1:
        hm = _dense_factor(m).to(device=x.device, dtype=x.dtype)
        y = torch.einsum("ik,...ij->...kj", hm, y)
    return (y / math.sqrt(n)).reshape(x.shape)


def apply_hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` along the last dim, ``H = (H_m ⊗ H_p) / √n`` orthogonal (``hadamard_factors``):
    a fast transform over the power-of-two factor, and over the other a small dense product
    (11008 = 344 · 32) or, from order ``FFT_MIN_ORDER`` on, Paley's core by FFT."""
    m, p = hadamard_factors(x.shape[-1])
    return _apply_factored(x, m, p)


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
        return dict(self.cast_each())

    def cast_each(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``cast``, one parameter at a time: what holds a model's worth of copies costs one
        parameter's (a 7B model's casts are ≈ 15 GB beside its ≈ 28 GB of float32 working copies)."""
        for path, value in self.params.items():
            p = self.model.get_parameter(path)
            yield path, value.to(device=p.device, dtype=p.dtype)

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
        for path, value in self.cast_each():
            owner, _, leaf = path.rpartition(".")
            lq = state.linears.get(owner)
            if leaf == "weight" and lq is not None and (lq.codes is not None or lq.weight is not None):
                continue
            state.float_params[path] = value.detach().cpu()


@contextmanager
def edited(model: nn.Module, edit: FloatEdit) -> Iterator[nn.Module]:
    """The model computing with ``edit`` inside the block (parameters written in place, online
    transforms as first pre-hooks), restored on exit. The saved originals wait in host memory and
    the casts are made one at a time: on a GPU the block costs no model-sized copies beside the
    edit's working copies (QuaRot on a 7B model peaked at 72.6 GiB with both on the card)."""
    saved: dict[str, torch.Tensor] = {}
    handles = []
    try:
        with torch.no_grad():
            for path, value in edit.cast_each():
                p = model.get_parameter(path)
                saved[path] = p.detach().to("cpu", copy=True)
                p.copy_(value)
                del value
        for linear, spec in edit.online.items():
            handles.append(add_online_hook(model.get_submodule(linear), spec))
        yield model
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for path, value in saved.items():
                model.get_parameter(path).copy_(value)
