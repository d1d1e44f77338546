"""Fused CPU kernels of an SPD training step (fp32, C++, vectorised), each with a fallback.

**The one-hidden-layer ``mlp`` CI function** (:func:`one_hidden_mlp`).
``z[n, c] = sum_j w2[c, j] gelu(h[n, c] w1[c, j] + b1[c, j]) + b2[c]`` (sheet §2: C independent
MLPs ``1 -> H -> 1`` with the erf GELU) and its backward, each ONE pass over the ``N x C x H``
hidden values that nothing stores:

* the forward needs ``gelu(a) = a Phi(a)``;
* the backward recomputes ``a`` and takes ``gelu'(a) = Phi(a) + a phi(a)``; with
  ``t = dz w2 gelu'(a)`` it accumulates ``dw2 = sum_n dz gelu(a)``, ``db1 = sum_n t``,
  ``dw1 = sum_n t h`` (over positions) and ``dh = sum_j t w1`` (over hidden units) together.

``Phi`` and ``phi = exp(-a^2/2) / sqrt(2 pi)`` share one exponential: ``erf`` is Abramowitz &
Stegun 7.1.26 (absolute error < 1.5e-7), the form of ATen's own vectorised ``erf``, whose
``exp(-x^2)`` at ``x = a / sqrt 2`` is ``phi``'s. Vectors run over 16 (AVX-512) or 8 (AVX2)
positions of one component, so no horizontal sums are needed per position; the sums over
positions are flushed into doubles every 4,096 positions. Threads split the components.
Autograd on the broadcast form, or ``torch.compile`` of it, makes several passes over a stored
``(C, N, H)`` tensor and evaluates the exponential up to three times per hidden value; here a
TMS 5-2 CI function (N 4,096, C 20, H 16) runs forward + backward ~3x faster than the inductor
kernels.

**The leaky hard sigmoids** (:func:`leaky_sigmoids`): ``lower`` and ``upper`` of
:mod:`sparselens.core.sigmoids` from one pass over the logits, and their summed backward in one
pass, instead of ~7 elementwise ops forward and ~10 backward.

**Uniform noise** (:func:`uniform`): SplitMix64 (Steele, Lea & Flood 2014) of a counter, keyed by
one 64-bit draw from the caller's ``torch.Generator`` -- so a seeded run, and its resume from a
saved generator state, is reproducible -- giving two 24-bit uniforms in [0, 1) per output.
Counter-based, so it vectorises: torch's CPU ``uniform_`` runs mt19937 serially (~10 ns per
number here), a third of the mask cost of a TMS step.

The C++ is built once per machine through torch inductor's C++ code cache (the compiler, flags
and vector ISA torch.compile uses; cached on disk). Anything that cannot use it -- another
device or dtype, or a failed build (logged once) -- returns None and the caller falls back.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from sparselens.core.sigmoids import LEAK

logger = logging.getLogger(__name__)

_COMMON = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <algorithm>
#include <vector>
using Vec = at::vec::Vectorized<float>;
static constexpr int64_t VL = Vec::size();

static inline Vec gather(const float* p, int64_t stride, int64_t cnt) {
  alignas(64) float buf[VL] = {};
  for (int64_t i = 0; i < cnt; ++i) buf[i] = p[i * stride];
  return Vec::loadu(buf);
}

static inline void scatter(const Vec& v, float* p, int64_t stride, int64_t cnt) {
  alignas(64) float buf[VL];
  v.store(buf);
  for (int64_t i = 0; i < cnt; ++i) p[i * stride] = buf[i];
}

// Phi(a) = (1 + erf(a / sqrt 2)) / 2 and e = exp(-a^2 / 2), sharing one exp:
// erf|x| = 1 - t r(t) exp(-x^2), t = 1 / (1 + p |x|)  (Abramowitz & Stegun 7.1.26).
static inline void normal_parts(const Vec& a, Vec& Phi, Vec& e) {
  const Vec r2(0.70710678118654752f), p(0.3275911f), one(1.f), half(0.5f);
  const Vec p1(0.254829592f), p2(-0.284496736f), p3(1.421413741f);
  const Vec p4(-1.453152027f), p5(1.061405429f);
  const Vec x = a * r2;
  const Vec t = one / at::vec::fmadd(p, x.abs(), one);
  const Vec r = at::vec::fmadd(
      at::vec::fmadd(at::vec::fmadd(at::vec::fmadd(p5, t, p4), t, p3), t, p2), t, p1);
  e = (Vec(0.f) - x * x).exp_u20();
  const Vec q = half * r * t * e;  // (1 - erf|x|) / 2
  Phi = Vec::blendv(one - q, q, x < Vec(0.f));
}
"""

_FORWARD = r"""
// h, z: (N, C) row-major; w1, b1, w2: (C, H); b2: (C)
extern "C" void kernel(const float* h, const float* w1, const float* b1, const float* w2,
                       const float* b2, float* z, int64_t N, int64_t C, int64_t H,
                       int64_t threads) {
  #pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c = 0; c < C; ++c) {
    const float* w1c = w1 + c * H;
    const float* b1c = b1 + c * H;
    const float* w2c = w2 + c * H;
    for (int64_t n0 = 0; n0 < N; n0 += VL) {
      const int64_t cnt = std::min(VL, N - n0);
      const Vec hv = gather(h + n0 * C + c, C, cnt);
      Vec acc(b2[c]);
      for (int64_t j = 0; j < H; ++j) {
        const Vec a = at::vec::fmadd(hv, Vec(w1c[j]), Vec(b1c[j]));
        Vec Phi, e;
        normal_parts(a, Phi, e);
        acc = at::vec::fmadd(a * Phi, Vec(w2c[j]), acc);
      }
      scatter(acc, z + n0 * C + c, C, cnt);
    }
  }
}
"""

_BACKWARD = r"""
// h, dz, dh: (N, C) row-major; w1, b1, w2, dw1, db1, dw2: (C, H)
extern "C" void kernel(const float* h, const float* w1, const float* b1, const float* w2,
                       const float* dz, float* dh, float* dw1, float* db1, float* dw2,
                       int64_t N, int64_t C, int64_t H, int64_t threads) {
  const Vec k(0.3989422804014327f);  // 1 / sqrt(2 pi)
  #pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c = 0; c < C; ++c) {
    const float* w1c = w1 + c * H;
    const float* b1c = b1 + c * H;
    const float* w2c = w2 + c * H;
    std::vector<Vec> acc(3 * H, Vec(0.f));  // dw2 | db1 | dw1, one vector of positions each
    std::vector<double> total(3 * H, 0.0);
    int64_t blocks = 0;
    for (int64_t n0 = 0; n0 < N; n0 += VL) {
      const int64_t cnt = std::min(VL, N - n0);
      const Vec hv = gather(h + n0 * C + c, C, cnt);
      const Vec dzv = gather(dz + n0 * C + c, C, cnt);  // zero beyond cnt: no contribution
      Vec dhv(0.f);
      for (int64_t j = 0; j < H; ++j) {
        const Vec a = at::vec::fmadd(hv, Vec(w1c[j]), Vec(b1c[j]));
        Vec Phi, e;
        normal_parts(a, Phi, e);
        const Vec t = dzv * Vec(w2c[j]) * at::vec::fmadd(a, e * k, Phi);  // dz w2 gelu'(a)
        acc[j] = at::vec::fmadd(dzv, a * Phi, acc[j]);
        acc[H + j] = acc[H + j] + t;
        acc[2 * H + j] = at::vec::fmadd(t, hv, acc[2 * H + j]);
        dhv = at::vec::fmadd(t, Vec(w1c[j]), dhv);
      }
      scatter(dhv, dh + n0 * C + c, C, cnt);
      if (++blocks * VL >= 4096 || n0 + VL >= N) {
        for (int64_t i = 0; i < 3 * H; ++i) {
          total[i] += at::vec::vec_reduce_all<float>(
              [](Vec& x, Vec& y) { return x + y; }, acc[i]);
          acc[i] = Vec(0.f);
        }
        blocks = 0;
      }
    }
    for (int64_t j = 0; j < H; ++j) {
      dw2[c * H + j] = static_cast<float>(total[j]);
      db1[c * H + j] = static_cast<float>(total[H + j]);
      dw1[c * H + j] = static_cast<float>(total[2 * H + j]);
    }
  }
}
"""


_LEAKY_FORWARD = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <algorithm>
using Vec = at::vec::Vectorized<float>;
// lower = clamp(z, 0, 1); upper = z > 1 ? 1 + leak (z - 1) : clamp(z, 0, 1); NaN stays NaN
extern "C" void kernel(const float* z, float* lower, float* upper, int64_t n, float leak) {
  const Vec zero(0.f), one(1.f), lk(leak);
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t cnt = std::min<int64_t>(Vec::size(), n - i);
    const Vec v = Vec::loadu(z + i, cnt);
    const Vec c = at::vec::clamp(v, zero, one);
    c.store(lower + i, cnt);
    Vec::blendv(c, one + lk * (v - one), v > one).store(upper + i, cnt);
  }
}
"""

_LEAKY_BACKWARD = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <algorithm>
using Vec = at::vec::Vectorized<float>;
// d lower: g inside (0, 1]; leak g where z <= 0 and g < 0 (it would raise z); else 0.
// d upper: leak g above 1; g on [0, 1] (clamp's inclusive bounds); 0 below 0.
extern "C" void kernel(const float* z, const float* gl, const float* gu, float* dz, int64_t n,
                       float leak) {
  const Vec zero(0.f), one(1.f), lk(leak);
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t cnt = std::min<int64_t>(Vec::size(), n - i);
    const Vec v = Vec::loadu(z + i, cnt), a = Vec::loadu(gl + i, cnt), b = Vec::loadu(gu + i, cnt);
    const Vec dl = Vec::blendv(Vec::blendv(zero, lk * a, (v <= zero) & (a < zero)), a,
                               (v > zero) & (v <= one));
    const Vec du = Vec::blendv(Vec::blendv(zero, b, v >= zero), lk * b, v > one);
    (dl + du).store(dz + i, cnt);
  }
}
"""

_UNIFORM = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <cstdint>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("tree-loop-vectorize")  // inductor's flags turn GCC's loop vectoriser off
#endif
// w_i = splitmix64(key + (i + 1) * golden), i < m = ceil(n / 2): out[i] = bits 40..63 of w_i,
// out[m + i] = bits 8..31 of w_i; each / 2^24. An odd count n shares its n values with n + 1.
static inline uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
extern "C" void kernel(const int64_t* key, float* __restrict__ out, int64_t n) {
  const uint64_t k = static_cast<uint64_t>(key[0]);
  const float scale = 1.0f / 16777216.0f;
  const int64_t m = (n + 1) / 2, rest = n - m;
  float* __restrict__ hi = out;
  float* __restrict__ lo = out + m;
  for (int64_t i = 0; i < rest; ++i) {
    const uint64_t w = mix(k + static_cast<uint64_t>(i + 1) * 0x9E3779B97F4A7C15ull);
    hi[i] = static_cast<float>(static_cast<int32_t>(w >> 40)) * scale;
    lo[i] = static_cast<float>(static_cast<int32_t>((w >> 8) & 0xFFFFFFull)) * scale;
  }
  if (m > rest) {
    const uint64_t w = mix(k + static_cast<uint64_t>(m) * 0x9E3779B97F4A7C15ull);
    hi[m - 1] = static_cast<float>(static_cast<int32_t>(w >> 40)) * scale;
  }
}
"""

_F, _OUT, _I64 = "const float*", "float*", "int64_t"
_SOURCES: dict[str, tuple[list[str], str]] = {
    "mlp_forward": ([_F] * 5 + [_OUT] + [_I64] * 4, _COMMON + _FORWARD),
    "mlp_backward": ([_F] * 5 + [_OUT] * 4 + [_I64] * 4, _COMMON + _BACKWARD),
    "leaky_forward": ([_F, _OUT, _OUT, _I64, "float"], _LEAKY_FORWARD),
    "leaky_backward": ([_F, _F, _F, _OUT, _I64, "float"], _LEAKY_BACKWARD),
    "uniform": (["const int64_t*", _OUT, _I64], _UNIFORM),
}


class _Build:
    """The compiled kernels by name, all built on first use; ``failed`` after a build error."""

    fns: ClassVar[dict[str, Any]] = {}
    failed = False

    @classmethod
    def get(cls) -> bool:
        if cls.fns:
            return True
        if cls.failed:
            return False
        try:
            from torch._inductor.codecache import CppPythonBindingsCodeCache as cache

            fns = {k: cache.load_pybinding(a, src) for k, (a, src) in _SOURCES.items()}
        except Exception as e:  # no compiler, unsupported platform: fall back, never fail a run
            cls.failed = True
            logger.warning("building the fused SPD kernels failed (%s); using the fallback", e)
            return False
        cls.fns = fns
        return True


def usable(*tensors: Tensor) -> bool:
    """True if the kernels apply to these tensors (CPU, fp32) and are built."""
    ok = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    return ok and _Build.get()


class _FusedOneHidden(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        lead, C = h.shape[:-1], h.shape[-1]
        hf = h.reshape(-1, C).contiguous()
        w1, b1, w2 = w1.contiguous(), b1.contiguous(), w2.contiguous()
        H = w1.shape[1]
        z = torch.empty_like(hf)
        threads = torch.get_num_threads()
        _Build.fns["mlp_forward"](hf, w1, b1, w2, b2.contiguous(), z, hf.shape[0], C, H, threads)
        ctx.save_for_backward(hf, w1, b1, w2)
        ctx.lead = lead
        return z.reshape(*lead, C)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dz: Tensor) -> tuple[Tensor, ...]:
        hf, w1, b1, w2 = ctx.saved_tensors
        N, C = hf.shape
        H = w1.shape[1]
        dzf = dz.reshape(N, C).contiguous()
        dh = torch.empty_like(hf)
        dw1, db1, dw2 = torch.empty_like(w1), torch.empty_like(b1), torch.empty_like(w2)
        threads = torch.get_num_threads()
        _Build.fns["mlp_backward"](hf, w1, b1, w2, dzf, dh, dw1, db1, dw2, N, C, H, threads)
        return dh.reshape(*ctx.lead, C), dw1, db1, dw2, dzf.sum(0)


def one_hidden_mlp(h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor | None:
    """``z (..., C)`` of C MLPs ``1 -> H -> 1`` on ``h (..., C)`` with ``w1, b1, w2 (C, H)`` and
    ``b2 (C)``, by the fused kernels; None where they do not apply (see the module docstring)."""
    C = h.shape[-1]
    if w1.dim() != 2 or w1.shape[0] != C or b1.shape != w1.shape or w2.shape != w1.shape:
        raise ValueError(
            f"w1, b1, w2 must have shape (C, H) with C = {C} (h's last axis); got "
            f"{tuple(w1.shape)}, {tuple(b1.shape)}, {tuple(w2.shape)}"
        )
    if b2.shape != (C,):
        raise ValueError(f"b2 must have shape ({C},), got {tuple(b2.shape)}")
    if h.numel() == 0 or not usable(h, w1, b1, w2, b2):
        return None
    return _FusedOneHidden.apply(h, w1, b1, w2, b2)


class _LeakySigmoids(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor) -> tuple[Tensor, Tensor]:
        zc = z.contiguous()
        lower, upper = torch.empty_like(zc), torch.empty_like(zc)
        _Build.fns["leaky_forward"](zc, lower, upper, zc.numel(), LEAK)
        ctx.save_for_backward(zc)
        return lower, upper

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_lower: Tensor | None, g_upper: Tensor | None) -> Tensor:
        (zc,) = ctx.saved_tensors
        gl = torch.zeros_like(zc) if g_lower is None else g_lower.contiguous()
        gu = torch.zeros_like(zc) if g_upper is None else g_upper.contiguous()
        dz = torch.empty_like(zc)
        _Build.fns["leaky_backward"](zc, gl, gu, dz, zc.numel(), LEAK)
        return dz


def leaky_sigmoids(z: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(lower_leaky(z), upper_leaky(z))`` (:mod:`sparselens.core.sigmoids`) by one fused pass
    forward and one backward (once differentiable: no double backward); None where the kernels
    do not apply."""
    if z.numel() == 0 or not usable(z):
        return None
    return _LeakySigmoids.apply(z)


def uniform(
    shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None
) -> Tensor | None:
    """``U[0, 1)`` float32 noise of ``shape`` on CPU (24-bit resolution, like ``torch.rand``),
    keyed by one int64 drawn from ``generator`` (the default generator if None); None where the
    kernels do not apply (then the caller draws with ``torch.rand``)."""
    if generator is not None and generator.device.type != "cpu":
        return None
    if not _Build.get():
        return None
    cpu = torch.device("cpu")  # never the default device: the kernel reads host memory
    key = torch.randint(
        -(2**63), 2**63 - 1, (1,), dtype=torch.int64, generator=generator, device=cpu
    )
    out = torch.empty(tuple(shape), dtype=torch.float32, device=cpu)
    if out.numel():
        _Build.fns["uniform"](key, out, out.numel())
    return out


__all__ = ["leaky_sigmoids", "one_hidden_mlp", "uniform", "usable"]
