"""rope_attention: rotary position embedding of q and k fused with scaled
dot-product attention (flash-style: no seqlen x seqlen matrix)."""

from __future__ import annotations

import os

import torch

from . import _band_attention, _checks
from ._fake import rope_attention as _fake_rope_attention
from ._autograd import functorch as _functorch
from .apply_rope import apply_rope_qk

__all__ = ["rope_attention"]

_FLOAT32_MAX = _checks.FLOAT32_MAX
_INT64_MAX = 2**63 - 1


_NO_WINDOW = (-1, -1)
# Query rows per block of the unfused attentions (one SDPA call of a windowed attention,
# one block of the block attention): at most _BAND_ROWS, and about the band's width where
# that is more than _MIN_BAND_ROWS (a block of r rows computes r x (r + width - 1) scores,
# r x width of them seen). Masks are (rows x (rows + width - 1)), never seqlen x seqlen.
_BAND_ROWS = 1024
_MIN_BAND_ROWS = 256
# Score elements of one block of the unfused block attention (soft-capped, sunk or
# deterministic calls; float32: 256 MiB); its rows shrink (down to 16) so that (batch x
# heads x rows x keys) stays within it.
_BLOCK_SCORES = 2**26


def _is_windowed(window, causal) -> bool:
    """Whether window_size (left, right) restricts attention beyond ``causal``."""
    return window[0] >= 0 or (window[1] >= 0 and not causal)


def _band_sdpa(q, k, v, causal, scale, window, softcap=0.0, deterministic=False, sinks=None):
    """Scaled dot-product attention of (..., heads, seqlen, headdim) q, k, v, where query
    i sees keys j with i - left <= j <= i + right (a bound of -1: none; causal: right = 0),
    run over blocks of query rows with the keys their band covers and a boolean mask of
    that block only. Differentiable through SDPA. With a soft-cap or attention sinks (which
    SDPA has not), or ``deterministic`` (SDPA's CUDA backends add dq with float atomics
    unless torch's global deterministic mode is on), _band_attention.BlockAttention over
    such blocks (recomputed in its backward, which has no atomics)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    blocks = bool(softcap) or deterministic or sinks is not None
    if not _is_windowed(window, causal) and not blocks:
        return sdpa(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
    S = q.shape[-2]
    # a bound past the sequence is none (and must not overflow int64 in the comparisons below)
    left, right = min(window[0], S), (0 if causal else min(window[1], S))
    # the keys a query row sees at most; blocks of about as many rows waste at most half of
    # what they compute (blocks of 1024 rows computed 9x the seen scores of GPT-OSS's window
    # of 128), of no fewer than _MIN_BAND_ROWS rows (the steps of a block are launches)
    width = S if left < 0 or right < 0 else min(S, left + right + 1)
    rows = min(_BAND_ROWS, max(_MIN_BAND_ROWS, width))
    if blocks:  # one block's (..., rows, keys) scores at a time: fewer rows for many keys
        keys = min(S, rows + width - 1)  # of a block
        rows = max(16, min(rows, _BLOCK_SCORES // max(1, q.shape[:-2].numel() * keys)))
        return _band_attention.BlockAttention.apply(q, k, v, sinks, scale, softcap, left, right, rows)[0]
    hq, hkv = q.shape[-3], k.shape[-3]
    if hq != hkv and hkv > 0 and hq % hkv == 0:
        # SDPA's memory-efficient kernels take no mask with enable_gqa (the math one would keep
        # every block's probabilities): repeat k and v over the group, as transformers does
        k, v = k.repeat_interleave(hq // hkv, dim=-3), v.repeat_interleave(hq // hkv, dim=-3)
    masks = _band_attention.BandMasks(left, right, q.device)
    outs = [sdpa(q[..., q0:q1, :], k[..., k0:k1, :], v[..., k0:k1, :], scale=scale, enable_gqa=True,
                 attn_mask=masks(q0, q1, k0, k1))
            for q0, q1, k0, k1 in _band_attention.query_blocks(S, rows, left, right)]
    return torch.cat(outs, dim=-2) if outs else sdpa(q, k, v, scale=scale, enable_gqa=True)


def _sdpa_fallback(q, k, v, cos, sin, position_ids, causal, softmax_scale, interleaved, window=_NO_WINDOW,
                   softcap=0.0, deterministic=False, sinks=None):
    # CUDA calls the fused forward does not take: the same math unfused, differentiable
    # through apply_rope_qk's and SDPA's own backward; the arguments checked as the op
    # checks them (the fake kernel's checks, the same messages; not while torch.compile
    # traces, which cannot trace their messages: there the calls below check them).
    if not torch.compiler.is_compiling():
        _fake_rope_attention._check("rope_attention", q, k, v, cos, sin, position_ids, softmax_scale)
        _check_sinks("rope_attention", sinks, q, packed=False)
    qr, kr = apply_rope_qk(q, k, cos, sin, position_ids, interleaved=interleaved)
    out = _band_sdpa(qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2), causal, softmax_scale, window,
                     softcap, deterministic, sinks)
    return out.transpose(1, 2)


def _check_sinks(op, sinks, q, packed):
    """sinks as the op checks them (the fake kernel's check and device; not their values,
    which on CUDA would cost a sync: NaN or +inf ones make their heads' rows NaN)."""
    if sinks is None:
        return
    if sinks.device != q.device:
        raise RuntimeError(f"{op}: sinks must be on {q.device} like q, got {sinks.device}")
    _fake_rope_attention._check_sinks(op, sinks, q, packed)


def _sequence_bounds(op, q, k, v, cos, sin, position_ids, softmax_scale, cu_seqlens) -> list[int]:
    """The arguments checked as the CPU op checks them: shapes, dtypes, tables and
    positions by the fake kernel's checks (the same messages), then cu_seqlens' values
    (rope_attention.cpp's check_cu_seqlens), which it returns as a list."""
    _fake_rope_attention._check(op, q, k, v, cos, sin, position_ids, softmax_scale, cu_seqlens)
    if cu_seqlens.device != q.device:
        raise RuntimeError(f"{op}: cu_seqlens must be on {q.device} like q, got {cu_seqlens.device}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"{op}: cu_seqlens must start at 0, got {bounds[0]}")
    for i in range(1, len(bounds)):
        if bounds[i] < bounds[i - 1]:
            raise ValueError(f"{op}: cu_seqlens must be non-decreasing, got {bounds[i - 1]} then {bounds[i]} "
                             f"at index {i}")
    if bounds[-1] != q.shape[0]:
        raise ValueError(f"{op}: cu_seqlens must end at the total tokens of q ({q.shape[0]}), got {bounds[-1]}")
    return bounds


def _varlen_unfused(q, k, v, cos, sin, position_ids, cu_seqlens, causal, softmax_scale, interleaved,
                    window=_NO_WINDOW, softcap=0.0, deterministic=False, sinks=None):
    """Packed sequences where the fused kernels do not take them (CUDA): apply_rope_qk on
    the packed tensors, then scaled_dot_product_attention sequence by sequence.
    Differentiable through both; reads cu_seqlens on the host (one synchronisation, a
    graph break under torch.compile)."""
    op = "rope_attention"
    bounds = _sequence_bounds(op, q, k, v, cos, sin, position_ids, softmax_scale, cu_seqlens)
    _check_sinks(op, sinks, q, packed=True)
    spans = [(s, e) for s, e in zip(bounds, bounds[1:]) if e > s]
    if position_ids is None:  # positions restart at 0 in each sequence
        longest = max((e - s for s, e in spans), default=0)
        if isinstance(cos, torch.Tensor) and cos.dim() == 2 and longest > cos.shape[0]:
            raise IndexError(f"{op}: position_ids is None, so positions run 0..len-1 in each sequence, but the "
                             f"longest sequence in cu_seqlens has {longest} tokens and cos/sin have only "
                             f"{cos.shape[0]} rows")
        position_ids = torch.cat([torch.arange(e - s, dtype=torch.int64) for s, e in spans]
                                 + [torch.zeros(0, dtype=torch.int64)]).to(q.device)
    qr, kr = apply_rope_qk(q, k, cos, sin, position_ids, interleaved=interleaved)
    # no token at all: one empty call, so that the (empty) output still depends on q, k, v
    outs = [_band_sdpa(qr[s:e].transpose(0, 1), kr[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                       causal, softmax_scale, window, softcap, deterministic, sinks).transpose(0, 1)
            for s, e in spans or [(0, 0)]]
    return torch.cat(outs)


@torch.compiler.assume_constant_result
def _autocast_available(device_type: str) -> bool:
    """torch.amp.is_autocast_available, a constant to torch.compile (torch 2.11's Dynamo
    cannot trace the C++ function it calls; later versions fold it themselves)."""
    return torch.amp.is_autocast_available(device_type)


def _autocast(q, k, v):
    """Under torch.autocast, q, k and v in the autocast dtype, as torch's
    scaled_dot_product_attention takes them (float64 and non-float tensors stay as
    they are; the tables stay float32). The casts are differentiable."""
    device_type = q.device.type
    if not (_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return q, k, v
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in (q, k, v))


def _cuda_kernel_takes(q, k, v, cos, interleaved) -> bool:
    """Whether the fused CUDA kernels (csrc/pirope/cuda/rope_attention_*) take a dense call
    without window or cap: float16/bfloat16, head dim 64 or 128, float32 tables (the op
    copies rows that are not 16-byte aligned). Traceable by torch.compile (shapes and
    dtypes only)."""
    rotary = 2 * cos.shape[-1] if cos.dim() == 2 else -1
    if q.dtype not in (torch.float16, torch.bfloat16) or cos.dtype != torch.float32:
        return False
    return (q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and q.shape[-1] in (64, 128)
            and rotary % (8 if interleaved else 16) == 0)


def _cuda_kernel_applies(q, k, v, cos, interleaved, deterministic=False) -> bool:
    """Whether a dense CUDA call without window or cap runs the fused kernels rather than
    apply_rope_qk + SDPA: when they take it, and either PIROPE_CUDA_ATTENTION=1 or an
    explicit ``deterministic=True``.

    They are opt-in: they are verified on H100 (earlier versions also on H200; outputs
    and gradients against float64, compute-sanitizer clean) but run forward + backward at
    0.44-0.50x of pirope rope + cuDNN SDPA on H100 (Hopper wgmma kernels; mma.sync
    elsewhere; see the README), so the default is the faster unfused path. Its backward (SDPA's) adds dq with float
    atomics unless torch's global deterministic mode is on, so deterministic=True takes
    the fused kernels' deterministic backward (verified bit-identical run to run on
    H100) where they apply. Traceable by torch.compile (the environment is read as a
    constant)."""
    wanted = deterministic or os.environ.get("PIROPE_CUDA_ATTENTION", "0") == "1"
    return wanted and _cuda_kernel_takes(q, k, v, cos, interleaved)


def rope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    interleaved: bool = False,
    deterministic: bool | None = None,
    cu_seqlens: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float | None = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotary embedding of ``q`` and ``k`` followed by softmax attention, fused.

    Same result as :func:`pirope.apply_rope_qk` followed by
    ``softmax(q k^T * softmax_scale [+ causal mask]) v``, computed tile by tile with an
    online softmax in float32 (float64 for float64 input), so no
    ``seqlen x seqlen`` matrix is ever materialised. On CPUs with AVX512-BF16,
    bfloat16 inputs are multiplied as bfloat16 with float32 sums, rounded where
    FlashAttention rounds (rotated q and k, probabilities, dS); other dtypes are
    multiplied in float32 (``PIROPE_CPU_GEMM=blas`` uses torch's BLAS instead of
    pirope's AVX512 tile kernels).

    Args:
        q: ``(batch, seqlen, nheads_q, headdim)``.
        k, v: ``(batch, seqlen, nheads_kv, headdim)``; ``nheads_q`` must be a
            multiple of ``nheads_kv`` (grouped-query / multi-query attention).
            q, k and v share dtype (float32, float64, float16, bfloat16) and device;
            any strides on the leading dims (a transpose of
            ``(batch, nheads, seqlen, headdim)`` works).
        cos, sin: ``(max_positions, rotary_dim // 2)`` float32 (or float64) tables,
            as for :func:`pirope.apply_rope`; features past ``rotary_dim`` pass
            through unrotated.
        position_ids: ``None``, ``(seqlen,)``, ``(batch, seqlen)`` or ``(1, seqlen)``;
            int32 or int64, values in ``[0, max_positions)``.
        causal: query ``i`` attends to keys ``j <= i`` (else to every key).
        softmax_scale: multiplies the scores before the softmax; default
            ``headdim ** -0.5``. Must be finite and > 0 (and at most the largest
            float32, 3.4e38, unless the inputs are float64: other dtypes are computed
            in float32). A scale so large that scores overflow float32 (near
            ``|softmax_scale * q.k| = 3.4e38``, or earlier where a tile product applies the
            scale before summing) gives NaN for their rows, as torch's SDPA does.
        interleaved: rotate pairs ``(2i, 2i+1)`` instead of ``(i, i + rotary_dim/2)``.
        deterministic: bit-identical gradients from run to run. ``None`` (default)
            follows ``torch.use_deterministic_algorithms``. The CPU backward is always
            deterministic. On CUDA pirope's fused kernels' fast backward adds dq
            contributions with float atomics (last bits vary), the deterministic one
            recomputes the scores per query block instead (no atomics; 7 instead of 5
            tile products; on an H100, forward + backward take 1.2-1.4x as long, bf16,
            2k-16k tokens). The default CUDA path's SDPA follows torch's global mode
            itself; ``deterministic=True`` there runs the fused kernels where they apply
            (float16/bfloat16, head dim 64 or 128, no window, cap or cu_seqlens), else
            the attention in float32 over blocks of query rows, recomputed in the
            backward by plain products (slower than SDPA, but no atomics).
        cu_seqlens: packed (variable-length) sequences, as in flash-attn's varlen
            functions: a 1-D int32/int64 tensor ``(nseqs + 1,)`` on q's device,
            ``0 = cu_seqlens[0] <= cu_seqlens[1] <= ... <= cu_seqlens[-1] = total``.
            q is then ``(total, nheads_q, headdim)`` and k, v ``(total, nheads_kv,
            headdim)``; sequence ``i`` is rows ``cu_seqlens[i]:cu_seqlens[i+1]``, and no
            token attends across sequences (``causal`` applies within each). Positions
            restart at 0 in each sequence unless ``position_ids`` (``(total,)`` or
            ``(1, total)``) gives them. Fused on CPU (forward and backward); on CUDA
            the call runs unfused, also with ``PIROPE_CUDA_ATTENTION=1``
            (:func:`pirope.apply_rope_qk`, then SDPA sequence by sequence; cu_seqlens
            is read on the host, a graph break under ``torch.compile``).
        window_size: ``(left, right)``, sliding-window (local) attention as in
            flash-attn: query ``i`` sees key ``j`` only when ``i - left <= j <= i +
            right`` (``-1``: no bound on that side; ``(-1, -1)``, the default: plain
            attention). ``causal=True`` keeps ``j <= i`` whatever ``right`` says, so
            transformers' sliding window ``W`` is ``window_size=(W - 1, 0)`` (or its
            flash path's ``(W - 1, W - 1)``). ``i`` and ``j`` count tokens of the
            sequence (with ``cu_seqlens``: of each sequence), not positions. Fused on CPU
            (tiles outside the band are skipped: the work grows with ``seqlen x
            window``); on CUDA the call runs unfused (:func:`pirope.apply_rope_qk`, then
            SDPA over blocks of query rows with the keys of their band).
        softcap: attention-logit soft-capping, as in Gemma 2 (``attn_logit_softcapping``)
            and flash-attn: each score ``s = softmax_scale * q.k`` becomes ``softcap *
            tanh(s / softcap)`` before the mask and the softmax. ``0`` (the default) or
            ``None``: no cap. Must be finite and >= 0 (and, unless the inputs are
            float64, within float32's range). Fused on CPU (forward and backward; the
            backward multiplies dS by ``1 - tanh^2``); on CUDA the call runs unfused
            (:func:`pirope.apply_rope_qk`, then the capped softmax in float32 over blocks
            of query rows, each recomputed in the backward rather than kept).
        sinks: attention sinks, as in GPT-OSS (its attention's ``sinks`` parameter,
            transformers' ``s_aux``): a ``(nheads_q,)`` floating tensor on q's device, one
            logit per query head that joins each softmax row of that head as a key
            without a value, so ``out = sum_j exp(s_j - lse) v_j`` with ``lse =
            log(sum_j exp(s_j) + exp(sinks[h]))`` (not scaled, not capped). ``None``
            (the default): none; ``-inf``: none for that head; NaN and ``+inf`` are
            refused on CPU, as are values past float32's range unless the inputs are
            float64 (they are computed in float32). Differentiable: the gradient of ``sinks[h]`` is ``-sum`` over
            the head's rows of ``exp(sinks[h] - lse) * rowsum(grad_out * out)``, in sinks'
            dtype. Fused on CPU (a row's online softmax starts from its sink; the
            backward is unchanged, its probabilities coming from that lse); on CUDA the
            call runs unfused (:func:`pirope.apply_rope_qk`, then the attention in float32
            over blocks of query rows, as with ``softcap``).

    Under ``torch.autocast``, q, k and v are cast to the autocast dtype first, as
    ``torch.nn.functional.scaled_dot_product_attention`` does (not float64 ones).

    Returns:
        ``(batch, seqlen, nheads_q, headdim)`` tensor of q's dtype (``(total,
        nheads_q, headdim)`` with ``cu_seqlens``). Differentiable in
        q, k and v (the backward is its own fused op; see ``deterministic``).

    On CUDA the call runs :func:`pirope.apply_rope_qk` followed by
    ``torch.nn.functional.scaled_dot_product_attention`` (same result, differentiable; it
    keeps the rotated q and k in memory), the fastest path today. With
    ``PIROPE_CUDA_ATTENTION=1`` (or ``deterministic=True``), float16/bfloat16 calls with
    head dim 64 or 128 run pirope's fused tensor-core kernels instead (forward and
    backward, q and k rotated on chip, dq and dk rotated back in the epilogue): verified,
    but forward + backward take about twice the time of pirope rope + cuDNN's attention on
    H100 (README, "GPU").
    """
    op = "rope_attention"
    _checks.tensor(op, "q", q)
    _checks.tensor(op, "k", k)
    _checks.tensor(op, "v", v)
    _checks.tensor(op, "cos", cos)
    _checks.tensor(op, "sin", sin)
    _checks.tensor(op, "position_ids", position_ids, optional=True)
    _checks.tensor(op, "cu_seqlens", cu_seqlens, optional=True)
    _checks.tensor(op, "sinks", sinks, optional=True)
    _checks.flag(op, "causal", causal)
    _checks.flag(op, "interleaved", interleaved)
    # a bound past int64 is the same window as INT64_MAX: no sequence is that long
    window = tuple(min(w, _INT64_MAX) for w in _checks.window(op, "window_size", window_size))
    _checks.no_forward_ad(op, *zip("q k v cos sin sinks".split(), (q, k, v, cos, sin, sinks)))
    _checks.constant_tables(op, cos, sin)
    q, k, v = _autocast(q, k, v)
    if softmax_scale is None:
        if q.dim() < 1 or q.shape[-1] < 1:
            raise ValueError(f"{op}: q must be (batch, seqlen, nheads_q, headdim) (or (total, nheads_q, "
                             f"headdim) with cu_seqlens) with headdim >= 1, "
                             f"got shape {tuple(q.shape)}")
        softmax_scale = q.shape[-1] ** -0.5
    softmax_scale = _checks.number(op, "softmax_scale", softmax_scale, positive=True)
    if softmax_scale > _FLOAT32_MAX and q.dtype != torch.float64:
        raise ValueError(f"{op}: softmax_scale must be at most {_FLOAT32_MAX} (the largest float32: {q.dtype} "
                         f"inputs are computed in float32), got {softmax_scale}")
    softcap = _checks.softcap(op, "softcap", softcap, q.dtype)
    # True as an argument, not by torch's global mode (which SDPA follows itself): the
    # unfused CUDA paths then avoid SDPA's backward (see _cuda_kernel_applies)
    asked_deterministic = deterministic is True
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    _checks.flag(op, "deterministic", deterministic)
    if cu_seqlens is not None and position_ids is not None and position_ids.dim() == 2 and position_ids.shape[0] == 1:
        position_ids = position_ids[0]  # Hugging Face's (1, total) of packed sequences
    if q.device.type == "cuda":
        for name, t in (("k", k), ("v", v)):
            if t.device != q.device:
                raise RuntimeError(f"{op}: {name} must be on {q.device} like q, got {t.device}")
        if cu_seqlens is not None:
            return _varlen_unfused(q, k, v, cos, sin, position_ids, cu_seqlens, causal, softmax_scale, interleaved,
                                   window, softcap, asked_deterministic, sinks)
        if (_is_windowed(window, causal) or softcap or sinks is not None
                or not _cuda_kernel_applies(q, k, v, cos, interleaved, asked_deterministic)):
            return _sdpa_fallback(q, k, v, cos, sin, position_ids, causal, softmax_scale, interleaved, window,
                                  softcap, asked_deterministic, sinks)
    out, _ = _functorch.call("rope_attention", q, k, v, cos, sin, position_ids, causal,
                             softmax_scale, interleaved, deterministic, cu_seqlens, *window, softcap, sinks)
    return out
