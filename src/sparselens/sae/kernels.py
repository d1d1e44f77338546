"""Encode/decode kernels for TopK sparse coders, each with a plain-autograd reference.

Dense products (no autograd): the encoder's :func:`linear` on CPU in float32 goes through
oneDNN's inner-product primitive (``torch.ops.mkldnn._linear_pointwise``, with the ReLU fused
in) — about 2x faster than ``F.linear``'s MKL sgemm on the AMD CPUs measured first, 1.1-1.3x on
an Intel Xeon; everything else (other dtypes, other devices, oneDNN missing or failing its
self-test, or ``SPARSELENS_ONEDNN=0``) uses ``F.linear``. :func:`matmul` (the AuxK products,
one side transposed) is ``torch.mm``.

Selection (:func:`topk_select`, no autograd): ``ReLU(x_in W_enc^T + b_enc)`` in row chunks of at
most :data:`CHUNK_ELEMS` elements on CPU (so no (N, M) buffer exists), each chunk giving its
top-k (or the top-4k, whose first k are the top-k, for Multi-TopK) and the AuxK candidates
(Gao et al. 2024, arXiv 2406.04093, App. A.2): the top-``k_aux`` ReLU'd pre-activations among
the dead latents, either as a dense (N, num_dead) code over the dead columns (``index_select``)
or, for many dead latents, as (N, k_aux) indices from a masked top-k.

Encoder gradient (:func:`encoder_grad`): attaches to precomputed ReLU'd values the gradient of
``ReLU(x_in W_enc^T + b_enc)`` at the selected entries only, respecting the ReLU mask (no
straight-through), for the sparse set (top-k ∪ aux ∪ 4k, as OpenAI's
``sparse_autoencoder/kernels.py``) and the dense dead-column code: ``grad_W = G^T x_in`` (an
embedding bag over the latent-sorted entries (:func:`code_layout`) for the sparse part, a GEMM
for the dense part, no (N*k, d) buffer), ``grad_b`` by
``index_add``, and the pre-encoder bias ``b_pre`` (``x_in = x - b_pre``, sparse coders' b_dec)
gets ``-W_enc^T grad_b`` — no (N, d) input gradient is formed unless ``x`` requires one.
sparsify's fused backward drops the aux/4k gradient and ignores the ReLU mask (reference sheet
§2.1); this one does neither.

Decode (:func:`decode`): ``out[n] = sum_j acts[n, j] W_dec[indices[n, j]]`` by embedding bag
(reference sheet §3.5: ~16x faster than a dense scatter + GEMM on CPU), optionally together with
the dense AuxK decode ``z W_dec[cols]`` (no ``b_dec``); one backward writes a single
``grad_W_dec``: ``G^T grad_out`` (embedding bag, as above) plus the dead rows' ``z^T grad_aux``,
and ``grad_acts`` through embedding_bag's per-sample-weights kernel. The latent sort is built
lazily and shared by the encoder and decoder backward (:class:`LazyLayout`); nothing on these
paths reads a value back to the host.

Triton paths are not implemented; everything here is pure torch and runs on any device.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

#: Upper bound on elements of temporary (rows, k, d) gathers (~64 MiB f32).
_GATHER_CHUNK_ELEMS = 1 << 24

#: CPU row chunks of the (N, M) pre-activations hold at most this many elements (16 MiB f32).
CHUNK_ELEMS = 1 << 22

_onednn_state: bool | None = None  # None: not probed yet


# ---- dense products -----------------------------------------------------------------------


def _probe_onednn() -> bool:
    """Whether oneDNN's inner product runs here and agrees with ``F.linear`` (tiny case)."""
    if os.environ.get("SPARSELENS_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        a, w, b = (torch.randn(*s, generator=g) for s in ((5, 7), (3, 7), (3,)))
        got = torch.ops.mkldnn._linear_pointwise(a, w, b, "relu", [None], "")
        return bool(torch.allclose(got, F.relu(F.linear(a, w, b)), atol=1e-5))
    except (AttributeError, RuntimeError):
        return False


def _onednn_available() -> bool:
    global _onednn_state
    if _onednn_state is None:
        _onednn_state = _probe_onednn()
    return _onednn_state


def use_onednn(enabled: bool | None) -> bool:
    """Turn the oneDNN path off (False), on where it works (True) or back to the default
    (None: on where it works, unless ``SPARSELENS_ONEDNN=0``); returns whether it is on."""
    global _onednn_state
    _onednn_state = False if enabled is False else None
    if enabled:
        _onednn_state = torch.backends.mkldnn.is_available() and _probe_onednn_forced()
    return _onednn_available()


def _probe_onednn_forced() -> bool:
    saved = os.environ.pop("SPARSELENS_ONEDNN", None)
    try:
        return _probe_onednn()
    finally:
        if saved is not None:
            os.environ["SPARSELENS_ONEDNN"] = saved


def _onednn_for(*ts: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ts) and (
        _onednn_available()
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, relu: bool = False) -> Tensor:
    """``x weight^T + bias`` (ReLU'd if ``relu``) for 2-D ``x``, without autograd."""
    with torch.no_grad():
        x, weight = x.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
        if _onednn_for(x, weight):
            attr, scalars = ("relu", [None]) if relu else ("none", [])
            try:
                return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, scalars, "")
            except RuntimeError:  # a layout oneDNN rejects (or a shape error F.linear reports)
                pass
        out = F.linear(x, weight, bias)
        return out.clamp_min_(0.0) if relu else out


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for 2-D tensors of any strides, without autograd.

    ``torch.mm`` (BLAS takes transposed operands as they are): for the AuxK products (one side
    transposed) it measured 1.1-1.4x faster than :func:`linear`, which must copy them."""
    with torch.no_grad():
        return torch.mm(a.detach(), b.detach())


# ---- latent-sorted layout and sparse products ----------------------------------------------

#: dtypes whose CPU embedding-bag kernels are used for ``G^T dense`` and the per-sample-weight
#: gradient; others (bf16/fp16) use the chunked index_add / gather paths, accumulating in float32.
_EB_DTYPES = (torch.float32, torch.float64)


class CodeLayout(NamedTuple):
    """An (N, k) index set sorted by latent: entry ``order[i]`` (flat ``n * k + j``) is the i-th;
    latent ``l``'s entries are ``offsets[l]:offsets[l + 1]``; ``tokens[i] = order[i] // k``."""

    order: Tensor
    offsets: Tensor
    tokens: Tensor


def code_layout(indices: Tensor, num_latents: int) -> CodeLayout:
    """The :class:`CodeLayout` of ``indices`` (N, k): one stable sort (on int32 keys, 2-4x faster
    than int64 on CPU) and a bincount. Deterministic, so gradients are bit-reproducible."""
    k = indices.shape[1]
    rows = indices.reshape(-1)
    keys = rows.to(torch.int32) if num_latents < 2**31 else rows
    order = torch.sort(keys, stable=True).indices
    offsets = torch.zeros(num_latents + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(torch.bincount(rows, minlength=num_latents), 0, out=offsets[1:])
    tokens = torch.div(order, max(k, 1), rounding_mode="floor")
    return CodeLayout(order, offsets, tokens)


class LazyLayout:
    """A :class:`CodeLayout` built on first use and shared (e.g. by the encoder and decoder
    backward of one forward, which see the same top-k indices): no sort when no gradient is
    taken, one sort for both when it is."""

    def __init__(self, indices: Tensor, num_latents: int) -> None:
        self.indices, self.num_latents = indices, num_latents
        self._layout: CodeLayout | None = None

    def get(self) -> CodeLayout:
        if self._layout is None:
            self._layout = code_layout(self.indices, self.num_latents)
        return self._layout


def _code_transpose_matmul(
    indices: Tensor, values: Tensor, dense: Tensor, m: int, layout: LazyLayout | None = None
) -> Tensor:
    """``G^T @ dense`` -> (m, d), ``G`` the (N, m) sparse code ``G[n, indices[n, j]] += values``.

    float32/float64: one embedding bag over the latent-sorted layout (bag ``l`` sums
    ``values * dense[token]`` over latent ``l``'s entries; no (N*k, d) buffer, empty bags give 0).
    Other dtypes: row-chunked ``index_add_`` of outer products, accumulated in float32.
    """
    if indices.numel() == 0:
        return dense.new_zeros(m, dense.shape[1])
    if dense.dtype in _EB_DTYPES:
        lay = (layout if layout is not None else LazyLayout(indices, m)).get()
        w = values.reshape(-1).to(dense.dtype)[lay.order]
        return F.embedding_bag(
            lay.tokens,
            dense.contiguous(),
            lay.offsets,
            mode="sum",
            per_sample_weights=w,
            include_last_offset=True,
        )
    n, k = indices.shape
    d = dense.shape[1]
    acc_dtype = torch.promote_types(dense.dtype, torch.float32)
    out = torch.zeros(m, d, dtype=acc_dtype, device=dense.device)
    rows = max(1, _GATHER_CHUNK_ELEMS // max(1, k * d))
    for s in range(0, n, rows):
        v = values[s : s + rows].to(acc_dtype).unsqueeze(-1)
        outer = v * dense[s : s + rows].to(acc_dtype).unsqueeze(1)  # (r, k, d)
        out.index_add_(0, indices[s : s + rows].reshape(-1), outer.reshape(-1, d))
    return out.to(dense.dtype)


def _gathered_dot(grad_out: Tensor, weight: Tensor, indices: Tensor) -> Tensor:
    """``out[n, j] = <grad_out[n], weight[indices[n, j]]>``, gathered in row chunks."""
    n, k = indices.shape
    d = weight.shape[1]
    rows = max(1, _GATHER_CHUNK_ELEMS // max(1, k * d))
    out = grad_out.new_empty(n, k)
    for s in range(0, n, rows):
        w = weight[indices[s : s + rows]]  # (r, k, d)
        out[s : s + rows] = torch.bmm(w, grad_out[s : s + rows].unsqueeze(-1)).squeeze(-1)
    return out


def _direct_psw_grad(grad_out: Tensor, weight: Tensor, indices: Tensor) -> Tensor | None:
    """embedding_bag's CPU per-sample-weights backward kernel called directly (no forward
    recomputation); None where it does not apply (not CPU) or the private op is unavailable."""
    if grad_out.device.type != "cpu":
        return None
    n, k = indices.shape
    try:
        offsets = torch.arange(0, n * k, k, dtype=indices.dtype, device=indices.device)
        empty = indices.new_empty(0)  # offset2bag: unused by the CPU sum-mode kernel
        out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            grad_out, weight.detach(), indices.reshape(-1), offsets, empty, 0, -1
        )
    except (AttributeError, RuntimeError):
        return None
    return out.view(n, k)


def _per_sample_weight_grad(
    grad_out: Tensor, weight: Tensor, indices: Tensor, acts: Tensor
) -> Tensor:
    """``out[n, j] = <grad_out[n], weight[indices[n, j]]>`` by embedding_bag's own
    per-sample-weights backward (one fused pass, ~8x faster on CPU than gathering the rows):
    :func:`_direct_psw_grad` on CPU, else autograd of ``F.embedding_bag``. Half types go
    through :func:`_gathered_dot` (embedding_bag's CPU backward needs float/double).
    """
    if weight.dtype not in _EB_DTYPES:
        return _gathered_dot(grad_out, weight, indices)
    direct = _direct_psw_grad(grad_out, weight, indices)
    if direct is not None:
        return direct
    with torch.enable_grad():
        a = acts.detach().requires_grad_(True)
        out = F.embedding_bag(indices, weight.detach(), per_sample_weights=a, mode="sum")
        (grad,) = torch.autograd.grad(out, a, grad_out)
    return grad


# ---- selection (no autograd) ----------------------------------------------------------------


class Selection(NamedTuple):
    """Output of :func:`topk_select`; every tensor is detached and ReLU'd (>= 0).

    ``values``/``indices`` (N, w): the active latents (w = k for TopK; for BatchTopK and
    JumpReLU rows are padded to the widest row with zero values). ``multi_values``/
    ``multi_indices`` (N, k_multi), sorted, or None: the per-row top-``k_multi``. ``aux_z``
    (N, len(aux_cols)) or None: the dense AuxK code over ``aux_cols`` (top-``k_aux`` of each row,
    zero elsewhere). ``aux_values``/``aux_indices`` (N, k_aux) or None: the sparse AuxK code from
    ``aux_mask`` (non-dead picks, possible when fewer than k_aux latents are dead, are zero).
    ``min_positive`` (0-d) or None: BatchTopK's smallest positive selected value (inf if none).
    """

    values: Tensor
    indices: Tensor
    multi_values: Tensor | None
    multi_indices: Tensor | None
    aux_z: Tensor | None
    aux_values: Tensor | None
    aux_indices: Tensor | None
    min_positive: Tensor | None = None


def _chunk_rows(n: int, m: int, device: torch.device) -> int:
    if device.type != "cpu":
        return n
    return max(1, min(n, CHUNK_ELEMS // max(1, m)))


def _pad_rows(rows: Tensor, cols: Tensor, vals: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Row-sorted COO entries -> (N, w) values and indices padded with zeros (index 0), w = the
    widest row (>= 1; one host sync, as the width is a shape)."""
    counts = torch.bincount(rows, minlength=n)
    width = max(int(counts.max()) if n else 1, 1)
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.numel(), device=rows.device) - start[rows]
    out_v = vals.new_zeros(n, width)
    out_i = torch.zeros(n, width, dtype=torch.int64, device=rows.device)
    out_v[rows, pos] = vals
    out_i[rows, pos] = cols
    return out_v, out_i


def batch_topk_rows(p: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """BatchTopK (Bussmann et al. 2024): the ``N * k`` largest entries of the whole (N, M)
    ``p``, as padded rows (:func:`_pad_rows`), and the smallest positive one (inf if none)."""
    n, m = p.shape
    v, flat = p.reshape(-1).topk(min(n * k, n * m), sorted=False)
    rows = torch.div(flat, m, rounding_mode="floor")
    order = torch.argsort(rows, stable=True)
    rows, cols, v = rows[order], (flat % m)[order], v[order]
    min_pos = torch.where(v > 0, v, torch.full((), float("inf"), dtype=v.dtype, device=v.device))
    vals, idx = _pad_rows(rows, cols, v, n)
    return vals, idx, min_pos.min()


def jumprelu_rows(p: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor]:
    """JumpReLU: the entries of ReLU'd ``p`` (N, M) above ``threshold``, as padded rows."""
    rows, cols = (p > threshold.to(p.dtype)).nonzero(as_tuple=True)
    return _pad_rows(rows, cols, p[rows, cols], p.shape[0])


def topk_select(
    x_in: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    *,
    k_multi: int | None = None,
    aux_cols: Tensor | None = None,
    aux_mask: Tensor | None = None,
    k_aux: int = 0,
    batch: bool = False,
    threshold: Tensor | None = None,
    pre: Tensor | None = None,
) -> Selection:
    """Top-k of ``ReLU(x_in W_enc^T + b_enc)`` per row, plus the Multi-TopK and AuxK sets.

    ``x_in`` (N, d) is the encoder input (``x - b_dec`` for an SAE). ``k_multi`` (>= k): also
    return the sorted top-``k_multi`` (for TopK the top-k is its first k columns). AuxK:
    ``aux_cols`` (int64 column indices of the dead latents) gives the dense code ``aux_z`` of the
    top ``min(k_aux, len(aux_cols))`` dead pre-activations per row; ``aux_mask`` (bool (M,)) the
    sparse top-``k_aux`` over the masked columns instead (no host sync: fixed shapes).
    ``batch``: BatchTopK (:func:`batch_topk_rows`) instead of per-row top-k; ``threshold``:
    JumpReLU (:func:`jumprelu_rows`); both need the whole (N, M) matrix and sync once. Rows with
    fewer than k positive pre-activations are filled with arbitrary zero-valued latents.
    ``pre``: that ReLU'd (N, M) matrix when the caller already has it (it is read, not changed).
    """
    with torch.no_grad():
        x_in, W_enc, b_enc = x_in.detach(), W_enc.detach(), b_enc.detach()
        n, m = x_in.shape[0], W_enc.shape[0]
        dev, dt = x_in.device, W_enc.dtype
        per_row = not batch and threshold is None
        width = k if k_multi is None else k_multi
        vals = torch.empty(n, width, dtype=dt, device=dev)
        idx = torch.empty(n, width, dtype=torch.int64, device=dev)
        aux_z = aux_v = aux_i = None
        ka = ka_m = 0
        if aux_cols is not None and aux_cols.numel() > 0 and k_aux > 0:
            aux_z = torch.zeros(n, aux_cols.numel(), dtype=dt, device=dev)
            ka = min(k_aux, aux_cols.numel())
        not_dead = None
        if aux_mask is not None and k_aux > 0:
            ka_m = min(k_aux, m)
            aux_v = torch.empty(n, ka_m, dtype=dt, device=dev)
            aux_i = torch.empty(n, ka_m, dtype=torch.int64, device=dev)
            not_dead = ~aux_mask.to(dev)
        rows = _chunk_rows(n, m, dev) if per_row else n
        main: tuple[Tensor, Tensor] | None = None
        min_pos = None
        for s in range(0, n, rows):
            e = min(n, s + rows)
            p = linear(x_in[s:e], W_enc, b_enc, relu=True) if pre is None else pre[s:e]
            if per_row or k_multi is not None:
                torch.topk(p, width, dim=1, sorted=k_multi is not None, out=(vals[s:e], idx[s:e]))
            if batch:
                bv, bi, min_pos = batch_topk_rows(p, k)
                main = (bv, bi)
            elif threshold is not None:
                main = jumprelu_rows(p, threshold)
            if aux_z is not None and aux_cols is not None:
                v, j = p.index_select(1, aux_cols).topk(ka, dim=1, sorted=False)
                aux_z[s:e].scatter_(1, j, v)
            if aux_v is not None and aux_i is not None and not_dead is not None:
                q = p.masked_fill_(not_dead, -1.0) if pre is None else p.masked_fill(not_dead, -1.0)
                v, j = q.topk(ka_m, dim=1, sorted=False)
                aux_v[s:e], aux_i[s:e] = v.clamp_min_(0.0), j
        multi_v, multi_i = (None, None) if k_multi is None else (vals, idx)
        if main is None:
            main = (vals, idx) if k_multi is None else (vals[:, :k], idx[:, :k])
        return Selection(main[0], main[1], multi_v, multi_i, aux_z, aux_v, aux_i, min_pos)


# ---- encoder gradient -----------------------------------------------------------------------


def _relu_mask(grad: Tensor, values: Tensor) -> Tensor:
    """``grad`` where ``values > 0``, else 0: ReLU's own backward kernel (one fused pass, ~6x
    faster on CPU than ``torch.where(values > 0, grad, 0)``)."""
    return torch.ops.aten.threshold_backward(grad, values, 0)


class _EncoderGrad(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        b_pre: Tensor | None,
        W_enc: Tensor,
        b_enc: Tensor,
        x_in: Tensor,
        indices: Tensor,
        values: Tensor,
        cols: Tensor | None,
        z: Tensor | None,
        layout: LazyLayout | None,
    ) -> tuple[Tensor, Tensor | None]:
        ctx.set_materialize_grads(False)
        ctx.has_dense = cols is not None and z is not None
        ctx.layout = layout
        ctx.save_for_backward(x_in, W_enc, indices, values, cols, z)
        return values, z  # returned inputs become views that carry this node's gradient

    @staticmethod
    def backward(ctx: Any, grad_vals: Tensor | None, grad_z: Tensor | None) -> tuple[Any, ...]:
        x_in, W_enc, indices, values, cols, z = ctx.saved_tensors
        m = W_enc.shape[0]
        need_x, need_pre, need_w, need_b = ctx.needs_input_grad[:4]
        g = None if grad_vals is None else _relu_mask(grad_vals, values)
        gz = None if grad_z is None or not ctx.has_dense else _relu_mask(grad_z, z)
        grad_x = grad_pre = grad_w = grad_b = None
        if need_w:
            if g is not None:
                grad_w = _code_transpose_matmul(indices, g, x_in, m, ctx.layout)
            else:
                grad_w = W_enc.new_zeros(W_enc.shape)
            if gz is not None:
                grad_w.index_add_(0, cols, matmul(gz.t(), x_in))
        if need_b or need_pre:
            grad_b = W_enc.new_zeros(m)
            if g is not None:
                grad_b.index_add_(0, indices.reshape(-1), g.reshape(-1))
            if gz is not None:
                grad_b.index_add_(0, cols, gz.sum(0))
            if need_pre:  # x_in = x - b_pre: sum_n grad_x_in[n] = grad_b @ W_enc
                grad_pre = -(grad_b @ W_enc)
            if not need_b:
                grad_b = None
        if need_x:
            grad_x = x_in.new_zeros(x_in.shape)
            if g is not None:
                grad_x = F.embedding_bag(indices, W_enc, per_sample_weights=g, mode="sum")
            if gz is not None:
                grad_x = grad_x + matmul(gz, W_enc.index_select(0, cols))
        return grad_x, grad_pre, grad_w, grad_b, None, None, None, None, None, None


def encoder_grad(
    x: Tensor,
    b_pre: Tensor | None,
    W_enc: Tensor,
    b_enc: Tensor,
    x_in: Tensor,
    indices: Tensor,
    values: Tensor,
    cols: Tensor | None = None,
    z: Tensor | None = None,
    layout: LazyLayout | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``values`` (and the dense code ``z``) with the encoder's gradient attached.

    ``values`` (N, s) must be ``ReLU(x_in W_enc^T + b_enc)[n, indices[n, j]]`` and ``z`` (N, c)
    that matrix's columns ``cols``, zero outside the selected entries; ``x_in = x - b_pre`` (or
    ``x`` when ``b_pre`` is None), all as computed by :func:`topk_select`. The backward gives
    ``x``, ``b_pre``, ``W_enc`` and ``b_enc`` exactly the gradient of autograd through
    ``relu(linear(x - b_pre, W_enc, b_enc))`` at those entries (zero where the value is 0);
    repeated indices each contribute their own gradient. ``layout``: a :class:`LazyLayout` of
    ``indices`` to share with :func:`decode` (built here otherwise).
    """
    return _EncoderGrad.apply(x, b_pre, W_enc, b_enc, x_in, indices, values, cols, z, layout)


def encoder_select(x: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor) -> Tensor:
    """``ReLU(x W_enc^T + b_enc)[n, indices[n, j]]`` -> (N, s) with :func:`encoder_grad`'s
    backward (the dense pre-activations are formed once, without autograd)."""
    values = linear(x, W_enc, b_enc, relu=True).gather(1, indices)
    return encoder_grad(x, None, W_enc, b_enc, x.detach(), indices, values)[0]


def encoder_select_reference(x: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor) -> Tensor:
    """Plain-autograd reference for :func:`encoder_select` (dense ReLU, then gather)."""
    return F.relu(F.linear(x, W_enc, b_enc)).gather(1, indices)


def topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """TopK encoder ``(acts, indices)``, each (N, k): top-k of ``ReLU(x W_enc^T + b_enc)``.

    Which zero-valued latents fill a row with < k positive entries is arbitrary (as for the
    reference). Gradients as :func:`encoder_grad`.
    """
    sel = topk_select(x, W_enc, b_enc, k)
    acts, _ = encoder_grad(x, None, W_enc, b_enc, x.detach(), sel.indices, sel.values)
    return acts, sel.indices


def topk_encode_reference(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Plain-autograd reference for :func:`topk_encode`."""
    vals, indices = F.relu(F.linear(x, W_enc, b_enc)).topk(k, dim=1, sorted=False)
    return vals, indices


# ---- decode ---------------------------------------------------------------------------------


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        indices: Tensor,
        acts: Tensor,
        W_dec: Tensor,
        cols: Tensor | None,
        z: Tensor | None,
        layout: LazyLayout | None,
    ) -> tuple[Tensor, Tensor | None]:
        ctx.set_materialize_grads(False)
        ctx.layout = layout
        out = F.embedding_bag(indices, W_dec, per_sample_weights=acts, mode="sum")
        aux = None
        w_cols = None
        if cols is not None and z is not None:
            w_cols = W_dec.index_select(0, cols)
            aux = matmul(z, w_cols)
        ctx.save_for_backward(indices, acts, W_dec, cols, z, w_cols)
        return out, aux

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor | None, grad_aux: Tensor | None) -> tuple[Any, ...]:
        indices, acts, W_dec, cols, z, w_cols = ctx.saved_tensors
        grad_acts = grad_w = grad_z = None
        if grad_out is not None:
            grad_out = grad_out.contiguous()
            if ctx.needs_input_grad[1]:
                grad_acts = _per_sample_weight_grad(grad_out, W_dec, indices, acts)
            if ctx.needs_input_grad[2]:
                grad_w = _code_transpose_matmul(indices, acts, grad_out, W_dec.shape[0], ctx.layout)
        if grad_aux is not None and z is not None:
            if ctx.needs_input_grad[4]:
                grad_z = matmul(grad_aux, w_cols.t())
            if ctx.needs_input_grad[2]:
                if grad_w is None:
                    grad_w = W_dec.new_zeros(W_dec.shape)
                grad_w.index_add_(0, cols, matmul(z.t(), grad_aux))
        return None, grad_acts, grad_w, None, grad_z, None


def decode(
    indices: Tensor,
    acts: Tensor,
    W_dec: Tensor,
    cols: Tensor | None = None,
    z: Tensor | None = None,
    layout: LazyLayout | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``(sum_j acts[n, j] W_dec[indices[n, j]], z @ W_dec[cols])``, no bias, in one function.

    ``indices`` (N, k) int64, ``acts`` (N, k), ``W_dec`` (M, d); the optional dense part ``z``
    (N, c) over rows ``cols`` is the AuxK decode (second output None without it).
    Differentiable in ``acts``, ``z`` and ``W_dec`` (one ``grad_W_dec``, see the module doc);
    ``layout`` as in :func:`encoder_grad`.
    """
    return _Decode.apply(indices, acts, W_dec, cols, z, layout)


def topk_decode(indices: Tensor, acts: Tensor, W_dec: Tensor) -> Tensor:
    """Sparse decode ``out[n] = sum_j acts[n, j] W_dec[indices[n, j]]`` -> (N, d), no bias."""
    return decode(indices, acts, W_dec)[0]


def topk_decode_reference(indices: Tensor, acts: Tensor, W_dec: Tensor) -> Tensor:
    """Plain-autograd reference for :func:`topk_decode` (materialises the (N, k, d) gather)."""
    return (acts.unsqueeze(-1) * W_dec[indices]).sum(1)
