"""Fast path of RawNet2, and the plan that decides per machine which of its parts run.

The reference is the plain PyTorch of model_RawNet2.py; this module holds a second implementation
of three of its stages with the same math evaluated in another order (outputs and gradients equal
the reference's to float32 rounding: tests/test_fast.py holds them to 1e-4 relative, and they agree
to ~1e-5 or better):

1. ``sinc_abs_maxpool`` (any device) replaces the front end's
       y = F.conv1d(x, filters)           # (B, C, T - K + 1): the full-rate map
       y = F.max_pool1d(torch.abs(y), 3)  # (B, C, (T - K + 1) // 3)
   The reference materialises the full-rate map several times (the conv output, its absolute value,
   max-pool's int64 indices, and in backward a zero-filled full-rate gradient and |.|'s sign), each
   B x C x ~T floats: 120 MB per tensor for a CPU batch of 4, 3 GB for the paper's GPU batch of 100.
   Here the time axis is cut into chunks; each chunk is convolved (in polyphase form, see
   ``_polyphase_index``), rectified and pooled at once, and only the pooled output plus a 1-byte code
   per pooled value (which of the 3 samples won, and its sign) is kept for backward: 1/12 of one
   full-rate float map. Backward rebuilds each chunk's sparse full-rate gradient from those codes and
   calls the convolution's own backward on it, so nothing is recomputed and the full map never exists.
   ``sinc_abs_maxpool_fft`` is a second candidate for the front end: the convolution by FFTs, kept
   as the same 1-byte codes. It pays most in the backward, which PyTorch's CPU kernels run far
   below the forward's speed for a 1-channel input: both gradients are a correlation or
   convolution with the full-rate gradient, summed over channels or batch in the frequency domain,
   so only B + C inverse transforms are needed. Where a whole input window is 0 its output is set
   to exactly 0, as the direct convolution's. For few filters and short inputs (as in -demo) it
   runs the training front end about 2.5x as fast as the reference; for the paper's 128 filters
   over 59,049 samples the transforms cost more than they save (bench/README.md).
   ``sinc_abs_maxpool_folded``, the third, serves extraction (no gradients): SincConv's filters are
   symmetric, so each output needs only half the multiplies, x[t + k] + x[t + K - 1 - k] times the
   first half of the taps, as one matrix product per chunk of output samples, rectified and pooled
   in cache (1.4-1.9x the reference's front end for the paper model at one segment).
2. ``residual_blocks`` (CPU, float32) runs block0..5 in channels-last layout, where mkldnn's
   convolutions can be faster, with a GEMM weight gradient and a batch norm whose sums are as
   accurate as the reference kernel's (see the section below).
3. ``gru_forward`` (CPU, float32) is the GRU with all weight gradients in one GEMM each instead of
   an outer product per time step.
On GPU (and under autocast) parts 2 and 3 are not candidates: cuDNN already fuses them.

Whether each part is faster than the reference depends on the machine (AVX-512 or AVX2 kernels,
cache sizes, GPU), so the last section measures it on first use and caches the plan (``-fast auto``,
the scripts' default); bench/README.md has the figures and the plans chosen on the machines measured.
"""

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import sys
import tempfile
import threading
import time

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from tqdm import tqdm

# Full-rate values (batch x channels x time) per chunk: ~2 MB of float32 on CPU, to stay in cache
# (measured best in bench/train_step.py); on GPU chunks only bound the temporary memory.
CHUNK_ELEMS = {"cpu": 2 ** 19}
DEFAULT_GPU_CHUNK_ELEMS = 2 ** 28


def _pooled_chunk(batch, channels, pooled_len, q_taps, device):
    """Pooled positions per chunk for this batch and device (at least 1)."""
    step = CHUNK_ELEMS.get(device.type, DEFAULT_GPU_CHUNK_ELEMS) // (3 * batch * channels)
    if device.type == "cpu" and batch == 1:
        # PyTorch sends a batch-1 convolution whose input has at most 20,480 values to its slow
        # reference kernel instead of mkldnn's (3-4x slower here): keep batch-1 chunks above that.
        step = max(step, 20480 // 3 + 1 - (q_taps - 1))
    return max(1, min(pooled_len, step))


def _polyphase_index(taps, device):
    """Index into the filters padded by 2 zeros in front, giving the polyphase filter bank.

    With y = conv1d(x, w) and the pooling window p covering y[3p + r], r = 0, 1, 2, write the input
    in phases x_s[m] = x[3m + s]. Then y[3p + r] = sum_{s, q} w[3q + s - r] x_s[p + q]: a convolution
    at the pooled rate from 3 input channels (s) to 3 output channels per filter (r), with
    Q = (taps + 1) // 3 + 1 taps each, where w is 0 outside 0..taps-1. The 3 samples of each pooling
    window come out as 3 neighbouring channels, and the convolution's kernels (mkldnn in particular
    for the backward) run faster on this shape than on the 1-channel full-rate one; it only adds the
    few zero taps at the edges (255 multiplies per output instead of 251 for the paper's filters).
    """
    q_taps = (taps + 1) // 3 + 1
    r = torch.arange(3, device=device).view(3, 1, 1)
    s = torch.arange(3, device=device).view(1, 3, 1)
    q = torch.arange(q_taps, device=device).view(1, 1, q_taps)
    return (3 * q + s - r + 2).reshape(-1), q_taps  # in 0 .. 3 Q + 1; (r, s, q) order


def _polyphase_filters(w, index, q_taps):  # (C, 1, K) -> (3 C, 3, Q), output channel 3 c + r
    padded = F.pad(w[:, 0], (2, 3 * q_taps - w.shape[-1]))
    return padded[:, index].view(w.shape[0] * 3, 3, q_taps)


def _polyphase_input(x, length):  # (B, 1, T) -> (B, 3, length): x_s[m] = x[3m + s], zero-padded
    x = F.pad(x[:, 0], (0, 3 * length - x.shape[-1]))
    return x.view(x.shape[0], length, 3).transpose(1, 2).contiguous()


def _pool_codes(y, dim):
    """Max-pool 3 of |y| whose 3 samples run along ``dim`` of y (removed), and a 1-byte code per
    pooled value for the backward: +-(1 + which of the 3 is the maximum), signed like y there; 0
    where that y is exactly 0 (|.|'s gradient is 0 there, as torch.abs's is)."""
    value, offset = y.abs().max(dim=dim)                              # first maximum, as max_pool1d
    sign = torch.gather(y, dim, offset.unsqueeze(dim)).squeeze(dim).sign()
    return value, ((offset + 1) * sign).to(torch.int8)


def _full_rate_gradient(grad_out, code, dim):
    """The gradient of the 3 samples behind each pooled value, along a new axis ``dim``: the pooled
    gradient times sign(y) at the maximum, 0 at the other two."""
    c = code.unsqueeze(dim)
    offset = (c.abs().long() - 1).clamp_(min=0)
    g = grad_out.unsqueeze(dim) * c.sign()                             # d|y|/dy = sign(y)
    shape = list(code.shape)
    shape.insert(dim, 3)
    return torch.zeros(shape, dtype=grad_out.dtype, device=grad_out.device).scatter_(dim, offset, g)


class SincAbsMaxPool(torch.autograd.Function):
    """``max_pool1d(|conv1d(x, w)|, 3)`` for one input channel, in polyphase form, chunked over time."""

    @staticmethod
    def forward(ctx, x, w):  # x (B, 1, T), w (C, 1, K) -> (B, C, P), P = (T - K + 1) // 3
        batch, _, length = x.shape
        channels, _, taps = w.shape
        pooled_len = (length - taps + 1) // 3
        index, q_taps = _polyphase_index(taps, x.device)
        x3 = _polyphase_input(x, pooled_len + q_taps - 1)  # the padding meets only zero taps
        w3 = _polyphase_filters(w, index, q_taps)
        step = _pooled_chunk(batch, channels, pooled_len, q_taps, x.device)
        out = x.new_empty(batch, channels, pooled_len)
        code = torch.empty(batch, channels, pooled_len, dtype=torch.int8, device=x.device)
        for p0 in range(0, pooled_len, step):
            p1 = min(p0 + step, pooled_len)
            y = F.conv1d(x3[:, :, p0:p1 + q_taps - 1], w3).view(batch, channels, 3, p1 - p0)
            out[:, :, p0:p1], code[:, :, p0:p1] = _pool_codes(y, 2)
        ctx.save_for_backward(x3, w3, index, code)
        ctx.shapes = (length, taps, q_taps, step)
        return out

    @staticmethod
    @once_differentiable  # (all four backwards: a double backward raises instead of going wrong)
    def backward(ctx, grad_out):  # (B, C, P) -> grads of x (B, 1, T) and w (C, 1, K)
        x3, w3, index, code = ctx.saved_tensors
        length, taps, q_taps, step = ctx.shapes
        batch, channels, pooled_len = code.shape
        need_x, need_w = ctx.needs_input_grad
        grad_x3 = torch.zeros_like(x3) if need_x else None
        grad_w3 = torch.zeros_like(w3) if need_w else None
        grad_out = grad_out.contiguous()
        for p0 in range(0, pooled_len, step):
            p1 = min(p0 + step, pooled_len)
            g_full = _full_rate_gradient(grad_out[:, :, p0:p1], code[:, :, p0:p1], 2)
            g_full = g_full.view(batch, 3 * channels, p1 - p0)
            gx, gw, _ = torch.ops.aten.convolution_backward(
                g_full, x3[:, :, p0:p1 + q_taps - 1], w3, None, (1,), (0,), (1,), False, (0,), 1,
                (need_x, need_w, False))
            if need_x:
                grad_x3[:, :, p0:p1 + q_taps - 1] += gx
            if need_w:
                grad_w3 += gw
        grad_x = grad_w = None
        if need_x:  # back from phases to time; the zero padding's gradient is dropped
            grad_x = grad_x3.transpose(1, 2).reshape(batch, 1, -1)[:, :, :length]
            grad_x = F.pad(grad_x, (0, length - grad_x.shape[-1]))  # samples no output reads
        if need_w:  # each polyphase tap is one original tap (or padding): sum them back
            # (per output phase r the index is one-to-one, so three plain adds stay deterministic
            # on GPU, where index_add_ would use atomics)
            grad_padded = grad_w3.new_zeros(channels, 3 * q_taps + 2)
            for idx, part in zip(index.view(3, -1), grad_w3.view(channels, 3, -1).unbind(1)):
                grad_padded[:, idx] += part
            grad_w = grad_padded[:, 2:2 + taps].unsqueeze(1)
        return grad_x, grad_w


def sinc_abs_maxpool(x, filters):
    """Fused ``F.max_pool1d(torch.abs(F.conv1d(x, filters)), 3)``: x (B, 1, T), filters (C, 1, K)."""
    return SincAbsMaxPool.apply(x, filters)


# Per batch chunk of the FFT front end: channels x transform length values (~4 MB of float32 on
# CPU, so that the elementwise passes over a chunk (|.|, pooling, codes) run from the caches: the
# demo model's training front end took 0.11 s per step in chunks of 2 utterances against 0.13-0.15 s
# in chunks of 8 (bench/README.md); on GPU chunks only bound memory).
FFT_CHUNK_ELEMS = {"cpu": 2 ** 20}
DEFAULT_GPU_FFT_CHUNK_ELEMS = 2 ** 27


def fft_length(n):
    """The smallest 2^a 3^b 5^c >= n: a length every FFT library transforms fast."""
    best, p5 = None, 1
    while p5 < 2 * n:
        p3 = p5
        while p3 < 2 * n:
            p2 = p3
            while p2 < n:
                p2 *= 2
            best = p2 if best is None else min(best, p2)
            p3 *= 3
        p5 *= 5
    return best


def _fft_batch_step(x, channels, n):  # utterances per batch chunk of the FFT front end
    elems = FFT_CHUNK_ELEMS.get(x.device.type, DEFAULT_GPU_FFT_CHUNK_ELEMS)
    return max(1, min(x.shape[0], elems // (channels * n)))


def _fft_conv(x, spectrum, n, taps):
    """conv1d(x, w) for x (b, T), w's ``spectrum`` = conj(rfft(w, n)): (b, C, T - K + 1). Where the
    whole input window is 0 the output is set to exactly 0, as the direct convolution gives (the
    FFT leaves rounding noise there, whose sign |.|'s gradient would follow)."""
    length = x.shape[-1]
    y = torch.fft.irfft(torch.fft.rfft(x, n)[:, None] * spectrum, n)[:, :, :length - taps + 1]
    nonzero = F.pad((x != 0).to(torch.int32).cumsum(-1), (1, 0))
    silent = (nonzero[:, taps:] - nonzero[:, :-taps]) == 0                # (b, T - K + 1)
    if silent.any():
        y = y.masked_fill(silent[:, None], 0.0)
    return y


class SincAbsMaxPoolFFT(torch.autograd.Function):
    """``max_pool1d(|conv1d(x, w)|, 3)`` for one input channel, by FFTs, in batch chunks.

    Forward: y = irfft(rfft(x) conj(W)) (a correlation, y[t] = sum_k w[k] x[t + k]), rectified and
    pooled; only the pooled output and the 1-byte codes are kept. Backward, with g the full-rate
    gradient rebuilt from the codes:
        dx = sum_c g_c * w_c  (convolution),   dw_c = sum_b corr(x_b, g_bc),
    so with spectra X, G, W of length n >= T (no wrap-around reaches the kept samples):
        dx = irfft(sum_c G_c W_c),   dw_c = irfft(sum_b conj(G_bc) X_b)[:K].
    """

    @staticmethod
    def forward(ctx, x, w):  # x (B, 1, T), w (C, 1, K) -> (B, C, P), P = (T - K + 1) // 3
        batch, _, length = x.shape
        channels, _, taps = w.shape
        pooled_len = (length - taps + 1) // 3
        n = fft_length(length)
        step = _fft_batch_step(x, channels, n)
        spectrum = torch.fft.rfft(w[:, 0], n).conj().resolve_conj()
        out = x.new_empty(batch, channels, pooled_len)
        code = torch.empty(batch, channels, pooled_len, dtype=torch.int8, device=x.device)
        for b0 in range(0, batch, step):
            y = _fft_conv(x[b0:b0 + step, 0], spectrum, n, taps)[:, :, :3 * pooled_len]
            out[b0:b0 + step], code[b0:b0 + step] = _pool_codes(y.unflatten(2, (pooled_len, 3)), 3)
        ctx.save_for_backward(x, spectrum, code)
        ctx.shapes = (n, taps, step)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # (B, C, P) -> grads of x (B, 1, T) and w (C, 1, K)
        x, spectrum, code = ctx.saved_tensors
        n, taps, step = ctx.shapes
        batch, length = x.shape[0], x.shape[-1]
        need_x, need_w = ctx.needs_input_grad
        grad_x = x.new_empty(batch, 1, length) if need_x else None
        w_spectrum = spectrum.conj().resolve_conj() if need_x else None
        conj_grad_w_spectrum = torch.zeros_like(spectrum) if need_w else None  # sum_b G_bc conj(X_b)
        grad_out = grad_out.contiguous()
        for b0 in range(0, batch, step):
            b1 = min(b0 + step, batch)
            g_full = _full_rate_gradient(grad_out[b0:b1], code[b0:b1], 3).flatten(2)  # (b, C, 3P)
            g = torch.fft.rfft(g_full, n)                                                # (b, C, n/2 + 1)
            if need_x:
                grad_x[b0:b1, 0] = torch.fft.irfft((g * w_spectrum).sum(1), n)[:, :length]
            if need_w:
                # one utterance at a time, and conjugated at the end: an einsum here runs as n/2 + 1
                # tiny matrix products, and a product with a conjugated view copies it first
                x_spectrum = torch.fft.rfft(x[b0:b1, 0], n).conj().resolve_conj()
                for g_b, x_b in zip(g, x_spectrum):
                    conj_grad_w_spectrum.addcmul_(g_b, x_b)
        grad_w = (torch.fft.irfft(conj_grad_w_spectrum.conj(), n)[:, :taps].unsqueeze(1)
                  if need_w else None)
        return grad_x, grad_w


def _fft_abs_maxpool(x, w):
    """The forward alone (no codes kept), in batch chunks."""
    batch, length, (channels, _, taps) = x.shape[0], x.shape[-1], w.shape
    n = fft_length(length)
    step = _fft_batch_step(x, channels, n)
    spectrum = torch.fft.rfft(w[:, 0], n).conj().resolve_conj()
    out = x.new_empty(batch, channels, (length - taps + 1) // 3)
    for b0 in range(0, batch, step):
        out[b0:b0 + step] = F.max_pool1d(_fft_conv(x[b0:b0 + step, 0], spectrum, n, taps).abs(), 3)
    return out


def sinc_abs_maxpool_fft(x, filters):
    """``F.max_pool1d(torch.abs(F.conv1d(x, filters)), 3)`` by FFTs (same shapes); without gradients
    the forward keeps no codes."""
    if torch.is_grad_enabled() and (x.requires_grad or filters.requires_grad):
        return SincAbsMaxPoolFFT.apply(x, filters)
    return _fft_abs_maxpool(x, filters)


# Output samples (x utterances) per chunk of the folded front end: on CPU its folded input, 126
# values per sample for the paper's 251 taps, then takes ~1.5 MB and stays in cache for the product;
# on GPU chunks only bound the temporary memory (~130 MB).
FOLD_CHUNK_ROWS = {"cpu": 3072}
DEFAULT_GPU_FOLD_CHUNK_ROWS = 2 ** 18


def symmetric(filters):
    """Whether every filter reads the same backwards (SincConv's band-pass filters do)."""
    return filters.shape[-1] % 2 == 1 and torch.equal(filters, filters.flip(-1))


def sinc_abs_maxpool_folded(x, filters):
    """``F.max_pool1d(torch.abs(F.conv1d(x, filters)), 3)`` for symmetric filters, without gradients.

    With w[k] = w[K - 1 - k] and h = K // 2, each output is sum_{k <= h} w'[k] (x[t + k] + x[t + K - 1 - k]),
    w' = w with its centre tap halved (so x[t + h] + x[t + h] = 2 x[t + h] counts once, exactly): half
    the multiplies of the direct convolution, as one matrix product per chunk of output samples,
    rectified and pooled while the chunk is in cache.
    """
    batch, _, length = x.shape
    channels, _, taps = filters.shape
    half = taps // 2
    pooled_len = (length - taps + 1) // 3
    w_half = filters[:, 0, :half + 1].t().contiguous()                    # (h + 1, C)
    w_half[half] /= 2
    out = x.new_empty(batch, channels, pooled_len)
    rows = FOLD_CHUNK_ROWS.get(x.device.type, DEFAULT_GPU_FOLD_CHUNK_ROWS)
    step = max(1, rows // (3 * batch))                                     # pooled positions per chunk
    for p0 in range(0, pooled_len, step):
        p1 = min(p0 + step, pooled_len)
        n = 3 * (p1 - p0)
        window = x[:, 0, 3 * p0:3 * p0 + n + taps - 1]
        head = window[:, :n + half].unfold(1, half + 1, 1)                  # x[t + k], k = 0..h
        tail = window[:, half:].unfold(1, half + 1, 1).flip(-1)             # x[t + K - 1 - k]
        y = torch.matmul(head + tail, w_half).abs_()                        # (B, n, C)
        out[:, :, p0:p1] = y.view(batch, p1 - p0, 3, channels).amax(2).transpose(1, 2)
    return out


class GRUSequence(torch.autograd.Function):
    """One GRU layer over a whole sequence (PyTorch's equations, gate order r, z, n; h0 = 0) with a
    hand-written backward that computes the weight gradients in one matrix product over all time
    steps. PyTorch's CPU GRU instead adds a (3H x H) outer product per step, which at small batches
    costs more than the rest of the layer (it is memory-bound: 12 MB written per step for H = 1024).

        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
        z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        h' = (1 - z) * n + z * h
    """

    @staticmethod
    def forward(ctx, x, w_ih, w_hh, b_ih, b_hh):  # x (B, T, I) -> h_t for every t, (B, T, H)
        batch, steps, _ = x.shape
        hidden = w_hh.shape[1]
        gi = torch.addmm(b_ih, x.reshape(batch * steps, -1), w_ih.t()).view(batch, steps, 3, hidden)
        h = x.new_zeros(batch, hidden)
        saved = x.new_empty(5, steps, batch, hidden)  # h_prev, r, z, n, W_hn h + b_hn per step
        out = x.new_empty(batch, steps, hidden)
        for t in range(steps):
            gh = torch.addmm(b_hh, h, w_hh.t()).view(batch, 3, hidden)
            r = torch.sigmoid(gi[:, t, 0] + gh[:, 0])
            z = torch.sigmoid(gi[:, t, 1] + gh[:, 1])
            n = torch.tanh(gi[:, t, 2] + r * gh[:, 2])
            saved[0, t], saved[1, t], saved[2, t], saved[3, t], saved[4, t] = h, r, z, n, gh[:, 2]
            h = n + z * (h - n)
            out[:, t] = h
        ctx.save_for_backward(x, w_ih, w_hh, saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # (B, T, H) -> grads of x, w_ih, w_hh, b_ih, b_hh
        x, w_ih, w_hh, saved = ctx.saved_tensors
        h_prev, r, z, n, ghn = saved
        steps, batch, hidden = r.shape
        d_gi = x.new_empty(steps, batch, 3, hidden)  # gradient of the gates' input part
        d_gh = x.new_empty(steps, batch, 3, hidden)  # ... and of their hidden part
        dh = x.new_zeros(batch, hidden)
        for t in reversed(range(steps)):
            dh = dh + grad_out[:, t]
            d_n = dh * (1 - z[t]) * (1 - n[t] ** 2)                   # through tanh
            d_z = dh * (h_prev[t] - n[t]) * z[t] * (1 - z[t])         # through sigmoid
            d_r = d_n * ghn[t] * r[t] * (1 - r[t])
            d_gi[t, :, 0], d_gi[t, :, 1], d_gi[t, :, 2] = d_r, d_z, d_n
            d_gh[t, :, 0], d_gh[t, :, 1], d_gh[t, :, 2] = d_r, d_z, d_n * r[t]
            dh = dh * z[t] + d_gh[t].view(batch, -1) @ w_hh
        d_gi = d_gi.transpose(0, 1).reshape(batch * steps, -1)      # rows in x's (b, t) order
        d_gh = d_gh.view(steps * batch, -1)
        grad_x = (d_gi @ w_ih).view_as(x)
        grad_w_ih = d_gi.t() @ x.reshape(batch * steps, -1)
        grad_w_hh = d_gh.t() @ h_prev.reshape(steps * batch, hidden)
        return grad_x, grad_w_ih, grad_w_hh, d_gi.sum(0), d_gh.sum(0)


def gru_forward(gru, x):
    """``gru(x)[0]`` for a batch-first ``nn.GRU`` (any number of layers, h0 = 0), by GRUSequence;
    other GRUs (bidirectional, without bias, with dropout) run the module itself."""
    if not gru.batch_first or gru.bidirectional or not gru.bias or (gru.dropout and gru.training):
        return gru(x)[0]
    for layer in range(gru.num_layers):
        x = GRUSequence.apply(x, *(getattr(gru, f"{name}_l{layer}")
                                   for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))
    return x


# ---------------------------------------------------------------------------------------------
# Residual blocks in channels-last layout (CPU)
#
# mkldnn's convolutions run ~1.8x faster forward on channels-last (B, C, 1, T) tensors than on
# PyTorch's default (B, C, T) layout, and batch norm, LeakyReLU, max-pool and FMS run as fast there.
# Its convolution backward is not faster, so ConvCL computes the weight gradient itself: one batched
# matrix product per tap over each item's time steps. The block function mirrors
# model_RawNet2.ResidualBlock.forward line by line (including the legacy conv1 quirk); tests/test_fast.py
# ties the two together.

def _channels_last(x):  # (B, C, T) -> (B, C, 1, T) stored as (B, 1, T, C)
    return x.unsqueeze(2).contiguous(memory_format=torch.channels_last)


class ConvCL(torch.autograd.Function):
    """``conv1d(x, w, b, padding=K // 2)`` with kernel K = 1 or 3 on channels-last (B, C, 1, T) tensors.

    The weight gradient is computed here, contiguous like the weight (autograd's, through a 4-D view
    of the weight, comes back in channels-last strides, which DistributedDataParallel's gradient
    buckets do not expect and copy with a warning on every step)."""

    @staticmethod
    def forward(ctx, x, w, b):  # (B, C, 1, T), (O, C, K), (O,) -> (B, O, 1, T)
        ctx.save_for_backward(x, w)
        return F.conv2d(x, w.unsqueeze(2), b, padding=(0, w.shape[-1] // 2))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        taps = w.shape[-1]
        grad = grad.contiguous(memory_format=torch.channels_last)
        # input: the same convolution with the kernel transposed and flipped
        grad_x = F.conv2d(grad, w.transpose(0, 1).flip(-1).unsqueeze(2), padding=(0, taps // 2))
        batch, channels, _, steps = x.shape
        x_t = x.permute(0, 2, 3, 1).reshape(batch, steps, channels)      # views: (B, T, C)
        g_t = grad.permute(0, 2, 3, 1).reshape(batch, steps, -1)         # (B, T, O)
        # weight: out[t] = sum_k w_k x[t + k - K // 2] (zero padding at both ends), one batched
        # matrix product per tap over each item's time steps
        grad_w = w.new_empty(w.shape)
        for k in range(taps):
            shift = k - taps // 2
            g_k = g_t[:, max(0, -shift):steps - max(0, shift)]
            x_k = x_t[:, max(0, shift):steps - max(0, -shift)]
            grad_w[:, :, k] = torch.bmm(g_k.transpose(1, 2), x_k).sum(0)
        return grad_x, grad_w, g_t.sum((0, 1))


def _conv(conv, x):  # nn.Conv1d (kernel 3, padding 1; or kernel 1) on a channels-last tensor
    return ConvCL.apply(x, conv.weight, conv.bias)


_scratch = threading.local()


def _scratch_like(rows, slot=0):
    """A reusable buffer shaped like ``rows`` for temporaries that are summed and dropped at once.
    Fresh 40 MB tensors cost more in page faults than the arithmetic done in them; one buffer per
    thread, device, dtype and slot (the largest asked for so far) is kept instead."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (rows.device, rows.dtype, slot)
    buf = buffers.get(key)
    if buf is None or buf.numel() < rows.numel() or buf.is_inference():
        with torch.inference_mode(False):  # usable in and out of inference mode
            buffers[key] = buf = torch.empty(rows.numel(), dtype=rows.dtype, device=rows.device)
    return buf[:rows.numel()].view(rows.shape)


class BatchNormLeakyReLU(torch.autograd.Function):
    """``leaky_relu(batch_norm(x))`` in training mode for a channels-last (B, C, 1, T) tensor, seen
    as (B T, C) rows: nn.BatchNorm1d's arithmetic (biased variance to normalise, unbiased in the
    running average), then LeakyReLU in place.

    Why not PyTorch's fused channels-last batch norm: it accumulates each channel's statistics and
    gradient sums row by row, and where a sum nearly cancels (as in some of RawNet2's blocks) its
    float32 gradients end up 1e-3 off, against 4e-6 for the default layout's kernel. Here every
    per-channel sum is a ``torch.sum`` over the row axis (cascaded, as accurate as the reference).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, slope):
        rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])              # a view: (B T, C)
        n = rows.shape[0]
        mean = rows.sum(0) / n
        var = torch.sub(rows, mean, out=_scratch_like(rows)).square_().sum(0) / n
        running_mean.lerp_(mean, momentum)
        running_var.lerp_(var * (n / (n - 1)), momentum)
        invstd = torch.rsqrt(var + eps)
        scale = weight * invstd
        out = F.leaky_relu_(torch.addcmul(bias - mean * scale, rows, scale), slope)
        ctx.save_for_backward(rows, weight, mean, invstd, out)
        ctx.input_shape, ctx.slope = x.shape, slope
        return out.view(x.shape[0], 1, x.shape[3], x.shape[1]).permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        rows, weight, mean, invstd, out = ctx.saved_tensors
        batch, channels, _, steps = ctx.input_shape
        g = grad.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, channels)
        g = torch.ops.aten.leaky_relu_backward(g, out, ctx.slope, True)          # through LeakyReLU
        n = rows.shape[0]
        centred = torch.sub(rows, mean, out=_scratch_like(rows))                 # x - mean
        sum_g = g.sum(0)                                                          # = grad of bias
        sum_g_xhat = torch.mul(centred, g, out=_scratch_like(rows, 1)).sum(0) * invstd  # = grad of weight
        # (g - mean(g) - xhat mean(g xhat)) * weight * invstd, with xhat = (x - mean) * invstd
        grad_rows = torch.addcmul(g, centred, sum_g_xhat * (-invstd / n))
        grad_rows.sub_(sum_g / n).mul_(weight * invstd)
        grad_x = grad_rows.view(batch, 1, steps, channels).permute(0, 3, 1, 2)
        return grad_x, sum_g_xhat, sum_g, None, None, None, None, None


def _batch_norm_leaky_relu(bn, x, slope):  # leaky_relu(nn.BatchNorm1d(x)) on (B, C, 1, T)
    if type(bn) is not torch.nn.BatchNorm1d or bn.momentum is None or not bn.track_running_stats:
        # anything but RawNet2's plain BatchNorm1d: the module itself, on a (B, C, T) view (slower)
        return F.leaky_relu(bn(x.squeeze(2)), slope).unsqueeze(2)
    if not bn.training:
        y = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return F.leaky_relu(y, slope)
    bn.num_batches_tracked.add_(1)
    return BatchNormLeakyReLU.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                    bn.momentum, bn.eps, slope)


def _fms(x, fc):  # model_RawNet2.feature_map_scaling on (B, C, 1, T)
    s = torch.sigmoid(fc(x.mean((2, 3))))[:, :, None, None]
    return x * s + s


def _block(block, x, slope):  # model_RawNet2.ResidualBlock.forward on (B, C, 1, T)
    out = x
    if not block.first and (block.training or not block.legacy):
        out = _batch_norm_leaky_relu(block.bn1, x, slope)
    if block.legacy:
        out = x  # the released model's quirk: conv1 sees the raw input
    out = _conv(block.conv1, out)
    out = _conv(block.conv2, _batch_norm_leaky_relu(block.bn2, out, slope))
    identity = _conv(block.conv_downsample, x) if hasattr(block, "conv_downsample") else x
    out = F.max_pool2d(out + identity, (1, 3))
    return out if block.legacy else _fms(out, block.frm.fc)


def residual_blocks(model, x, slope):
    """block0..5 of ``model`` (and the legacy ``fc_attention``), (B, C, T) -> (B, C', T'); the
    result is a (B, C', T') view of channels-last memory."""
    x = _channels_last(x)
    for i in range(model.NB_BLOCKS):
        x = _block(getattr(model, f"block{i}")[0], x, slope)
        if model.legacy:
            x = _fms(x, getattr(model, f"fc_attention{i}")[0])
    return x.squeeze(2)


# ---------------------------------------------------------------------------------------------
# The plan: which implementation runs each stage of RawNet2.embed
#
# RawNet2.embed runs three stages through callables that ``stages_for`` picks: the front end
# (sinc conv -> |.| -> max-pool 3), the residual blocks and the GRU. Each has the reference
# implementation (a RawNet2 method) and the fast one above; both give the same numbers to float32
# rounding. Which one is faster depends on the machine (AVX-512 or AVX2, bf16 support, GPU), the
# batch and the model's size, so with ``model.fast = "auto"`` it is measured, as cuDNN's benchmark
# mode and FFTW's wisdom do: on first use at a new shape, each candidate of each stage runs a few
# times on a copy of the model at the real shapes (forward, and backward when gradients are on); the
# fastest is kept, unless it is not faster than the reference by MARGIN. The plan is cached in a
# small JSON file per machine (CPU model and flags, the KERNEL_ENV settings, threads),
# torch version, device and model configuration, and printed once per process in one line.
# The implementations round differently, so a training run keeps the plans it ran in its last.pt
# (``plans_in_use``), an extraction beside its logs, and a resumed run runs them again (``pin``),
# whatever the cache holds by then.

STAGES = ("front_end", "blocks", "gru")
REFERENCE_METHODS = {"front_end": "sinc_front_end", "blocks": "residual_stack", "gru": "gru_outputs"}
PLAN_PASSES = 2      # timed passes per candidate (after one untimed warm-up pass); the minimum is kept
MARGIN = 0.03        # a fast candidate must beat the reference by this fraction to be chosen
ELIMINATE_SECONDS = 0.25  # a warm-up pass of the reference this long lets clear losers be dropped ...
ELIMINATE_FACTOR = 1.5    # ... those this many times slower than it
LONG_PASS_SECONDS = 1.0   # a reference pass this long is timed once after the warm-up, not PLAN_PASSES
PLAN_FORMAT = 1      # version of the cache file's layout
CACHE_ENV = "RAWNET2_CACHE_DIR"
_plans = {}          # this process's plans: identity key -> plan
_ran = {}            # identity key -> {"identity", "plan"} of every plan this process ran
_pinned = {}         # identity key -> {"identity", "plan", "source"}, given by pin()
_bad_caches = set()  # cache files found unreadable (said once)


def fast_front_end(model, x):
    return sinc_abs_maxpool(x, model.first_conv.filters())


def fft_front_end(model, x):
    return sinc_abs_maxpool_fft(x, model.first_conv.filters())


def fold_front_end(model, x):
    filters = model.first_conv.filters()
    if not symmetric(filters):  # (SincConv's always are; anything else gets the direct convolution)
        return model.sinc_front_end(x)
    return sinc_abs_maxpool_folded(x, filters)


def fast_blocks(model, x):
    return residual_blocks(model, x, model.LEAKY_SLOPE)


def fast_gru(model, x):
    return gru_forward(model.gru, x)


# Each stage's implementations besides the reference, by the name a plan gives them.
IMPLEMENTATIONS = {"front_end": {"fast": fast_front_end, "fft": fft_front_end, "fold": fold_front_end},
                   "blocks": {"fast": fast_blocks}, "gru": {"fast": fast_gru}}


class Stages:
    """The three stage callables of one forward, each ``x -> y``, bound to ``model``."""

    def __init__(self, model, plan):
        self.plan = plan
        for stage in STAGES:
            if plan[stage] in IMPLEMENTATIONS[stage]:
                fn = IMPLEMENTATIONS[stage][plan[stage]].__get__(model)  # bound like a method: fn(x)
            else:
                fn = getattr(model, REFERENCE_METHODS[stage])
            setattr(self, stage, fn)


REFERENCE_PLAN = dict.fromkeys(STAGES, "reference")




def applicable(model, x):
    """{stage: implementations besides the reference that apply to this call}. The front end's
    apply everywhere (``fold`` without gradients only); the channels-last blocks and the GRU are
    float32 CPU code (on GPU cuDNN already does what they save, and under autocast the reference
    modules handle the dtypes)."""
    fp32_cpu = (x.device.type == "cpu" and model.ln.gamma.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu"))
    impls = {"front_end": ["fast", "fft"] + ([] if torch.is_grad_enabled() else ["fold"])}
    if fp32_cpu:
        impls.update(blocks=["fast"], gru=["fast"])
    return impls


def stages_for(model, x):
    """The one place that picks each stage's implementation, from ``model.fast``: False -> the
    reference; True -> the "fast" implementation of every stage it applies to; "auto" -> the
    measured plan (planned on first use at this shape, then cached); a dict -> that plan."""
    mode = model.fast
    if mode is False:
        return Stages(model, REFERENCE_PLAN)
    if isinstance(mode, dict):
        return Stages(model, {s: mode.get(s, "reference") for s in STAGES})
    fast = applicable(model, x)
    if mode is True:
        return Stages(model, {s: "fast" if "fast" in fast.get(s, ()) else "reference" for s in STAGES})
    if mode != "auto":
        raise ValueError(f"model.fast must be False, True, 'auto' or a plan dict, got {mode!r}")
    return Stages(model, planned(model, x, fast))


# -- identity of a plan -------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _cpuinfo():
    """The CPU's model name and the instruction-set flags that change which kernels run."""
    model_name, flags = "unknown", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model_name == "unknown":
                    model_name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "fma")
    return model_name, [f for f in wanted if f in set(flags.split())]


# The variables that cap the instruction sets of the CPU kernels: PyTorch's own (ATen), oneDNN's
# (convolutions) and MKL's (matrix products: the GRU and the linear layers). All three at AVX2 make
# an AVX-512 machine run the kernels an AVX2 one runs.
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def kernel_settings():
    """The KERNEL_ENV variables set in this process, as one line ("default" if none is)."""
    return ", ".join(f"{k}={os.environ[k]}" for k in KERNEL_ENV if k in os.environ) or "default"


def _cpu_identity():
    model_name, flags = _cpuinfo()
    return {"cpu": model_name, "cpu_flags": flags,
            "capability": torch.backends.cpu.get_cpu_capability(),
            **{k: os.environ.get(k, "") for k in KERNEL_ENV},
            "threads": torch.get_num_threads()}


# oneDNN instruction-set caps under which its bfloat16 kernels are emulated (those below AVX512_CORE_BF16).
NO_BF16_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_has_native_bf16():
    """Whether bfloat16 runs natively here: the CPU has AVX-512 BF16 or AMX, and oneDNN is not capped
    below them (``ONEDNN_MAX_CPU_ISA=AVX2``, or the older ``DNNL_MAX_CPU_ISA``, makes an AMX machine
    run as an AVX2 one, bf16 included). Without it bf16 is emulated, and bench/README.md measured bf16
    autocast 7-9x slower than float32."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    return bool({"avx512_bf16", "amx_bf16"} & set(_cpu_identity()["cpu_flags"])) and cap not in NO_BF16_ISAS


def tf32_settings():
    """Whether cuDNN's convolutions and CUDA's matrix products may run in TF32 (which changes both
    their speed and their rounding): PyTorch's allow_tf32 flags, or the values of its newer
    fp32_precision settings where those were used (the flags then refuse to be read)."""
    backends = torch.backends
    try:
        return {"conv": backends.cudnn.allow_tf32, "matmul": backends.cuda.matmul.allow_tf32}
    except RuntimeError:
        return {"conv": backends.cudnn.conv.fp32_precision, "matmul": backends.cuda.matmul.fp32_precision}


def device_identity(device):
    """What a plan depends on beyond the model: the machine, torch and the device."""
    ident = {"torch": torch.__version__, **_cpu_identity()}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        ident.update(gpu=torch.cuda.get_device_name(index),
                     gpu_capability=list(torch.cuda.get_device_capability(index)),
                     cudnn=torch.backends.cudnn.version(),
                     cudnn_benchmark=torch.backends.cudnn.benchmark,
                     cudnn_deterministic=torch.backends.cudnn.deterministic,
                     tf32=tf32_settings())
    ident["device"] = device.type
    return ident


def model_identity(model):
    """The configuration of the network below its classifier (shapes and layout). An nn.DataParallel
    replica holds its parameters as plain attributes: it takes the identity its network's last call
    recorded on the network (a replica copies the network's attributes); None for a replica of a
    network that was never identified."""
    if getattr(model, "_is_replica", False):
        digest = model.__dict__.get("_plan_shapes")
        if digest is None:
            return None
    else:
        shapes = [(name, list(p.shape)) for name, p in model.named_parameters()
                  if not name.startswith("fc2_gru")]
        layout = json.dumps([shapes, model.first_conv.kernel_size, model.legacy])
        digest = model._plan_shapes = hashlib.sha1(layout.encode()).hexdigest()[:16]
    return {"nb_samp": model.nb_samp, "legacy": model.legacy, "shapes": digest}


def call_context(model, x, candidates):
    """The shape of this call: batch (rounded up to a power of 2), mode, dtype, candidates
    ({stage: implementation names})."""
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else model.ln.gamma.dtype
    mode = ("train" if model.training else "eval") + ("" if torch.is_grad_enabled() else "-nograd")
    return {"batch": 1 << (x.shape[0] - 1).bit_length(), "mode": mode, "dtype": str(dtype).split(".")[-1],
            "candidates": {s: list(v) for s, v in candidates.items()}}


def plan_key(identity):
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


# -- the cache file -------------------------------------------------------------------------------

def cache_path():
    """``$RAWNET2_CACHE_DIR/plans.json``, else ``$XDG_CACHE_HOME/rawnet2/``, else ``~/.cache/rawnet2/``."""
    folder = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "rawnet2")
    return os.path.join(folder, "plans.json")


def _note(line):
    if int(os.environ.get("RANK", "0")) == 0:
        tqdm.write(line, file=sys.stderr)


def load_cache():
    """The cached plans ({key: entry}); an unreadable or foreign file is ignored with one line."""
    path = cache_path()
    try:
        with open(path) as f:
            data = json.load(f)
        if not (isinstance(data, dict) and data.get("format") == PLAN_FORMAT
                and isinstance(data.get("plans"), dict)):
            raise ValueError("not a plan file of this version")
        return data["plans"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        if path not in _bad_caches:
            _bad_caches.add(path)
            _note(f"note: ignoring the plan cache {path} ({type(e).__name__}: {e}); plans are measured again")
        return {}


def store(key, entry):
    """Add one plan to the cache file (written atomically; a read-only cache is left alone)."""
    path = cache_path()
    plans = load_cache()
    plans[key] = entry
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), suffix=".tmp", delete=False) as f:
            json.dump({"format": PLAN_FORMAT, "plans": plans}, f, indent=1, sort_keys=True)
        os.replace(f.name, path)
    except OSError as e:
        _note(f"note: could not write the plan cache {path} ({e}); the plan holds for this process")


def valid_plan(plan):
    """Whether ``plan`` names an implementation for every stage, or a segments-per-forward size."""
    if not isinstance(plan, dict):
        return False
    if set(plan) == {"segments_per_forward"}:
        size = plan["segments_per_forward"]
        return isinstance(size, int) and not isinstance(size, bool) and size > 0
    return set(plan) == set(STAGES) and all(
        plan[s] == "reference" or plan[s] in IMPLEMENTATIONS[s] for s in STAGES)


def lookup(key, identity):
    """(plan, where it comes from) for a plan whose identity matches exactly: this process's, one
    given by ``pin``, or the cache file's; (None, None) if there is none."""
    if key in _plans:
        return _plans[key], "this process"
    pinned = _pinned.get(key)
    if pinned is not None and pinned["identity"] == identity:
        return pinned["plan"], pinned["source"]
    entry = load_cache().get(key)
    if isinstance(entry, dict) and entry.get("identity") == identity and valid_plan(entry.get("plan")):
        return entry["plan"], f"cached in {cache_path()}"
    return None, None


def ran(key, identity, plan):
    """Record that this process runs ``plan`` (for ``plans_in_use``)."""
    _ran[key] = {"identity": identity, "plan": plan}


def plans_in_use():
    """{key: {"identity", "plan"}}: the plans this process ran, and those ``pin`` gave it, as plain
    JSON values. Training keeps them in last.pt (``torch.load(weights_only=True)`` reads them), an
    extraction in the folder of its logs."""
    entries = {**{k: {"identity": e["identity"], "plan": e["plan"]} for k, e in _pinned.items()}, **_ran}
    return json.loads(json.dumps(entries))


def pin(entries, source):
    """Run the plans of ``entries`` (``plans_in_use`` of an earlier process: a resumed run's) where
    their identity matches, before the cache's or a new measurement; ``source`` says where they come
    from in the plan's note. They replace those of an earlier call; entries that are not plans are
    ignored."""
    _pinned.clear()
    for key, entry in (entries or {}).items():
        if (isinstance(entry, dict) and isinstance(entry.get("identity"), dict)
                and valid_plan(entry.get("plan"))):
            _pinned[key] = {"identity": entry["identity"], "plan": entry["plan"], "source": source}
            _plans.pop(key, None)


def describe(plan, context, source):
    stages = ", ".join(f"{s.replace('_', ' ')} {plan[s]}" for s in STAGES)
    return (f"RawNet2 plan ({context['mode']}, batch <= {context['batch']}, {context['dtype']}): "
            f"{stages} ({source})")


# -- measuring --------------------------------------------------------------------------------------

def choose(timings, margin=MARGIN):
    """The plan of measured ``timings`` ({stage: {"reference": s, name: s, ...}}): per stage the
    fastest implementation when it beats the reference by ``margin``, else the reference (ties go
    to the name first in sorted order, so the plan depends on the timings alone)."""
    plan = dict(REFERENCE_PLAN)
    for stage, t in timings.items():
        others = sorted((seconds, name) for name, seconds in t.items() if name != "reference")
        if "reference" in t and others and others[0][0] < (1 - margin) * t["reference"]:
            plan[stage] = others[0][1]
    return plan


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast_state(device_type):
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _record_stage_inputs(probe, x):
    """Each stage's input (and the autocast state it runs under) in one reference forward."""
    inputs = {}

    class Recorder:
        def __init__(self):
            for stage in STAGES:
                setattr(self, stage, self._wrap(stage, getattr(probe, REFERENCE_METHODS[stage])))

        @staticmethod
        def _wrap(stage, fn):
            def run(inp):
                inputs[stage] = (inp.detach().clone(), _autocast_state(inp.device.type))
                return fn(inp)
            return run

    with torch.no_grad():
        probe.embed(x, stages=Recorder())
    return inputs


def _seconds_of(fn, inp, autocast, dtype, backward):
    """Seconds of one call of a stage implementation (and its backward, with ``backward``)."""
    with torch.autocast(inp.device.type, dtype=dtype, enabled=autocast), torch.set_grad_enabled(backward):
        _synchronize(inp.device)
        start = time.perf_counter()
        out = fn(inp.requires_grad_(backward) if backward else inp)
        if backward:
            out.backward(torch.ones_like(out))
        _synchronize(inp.device)
        seconds = time.perf_counter() - start
    inp.grad = None
    return seconds


def survivors(warm_up):
    """The implementations worth timing after the untimed warm-up pass (``warm_up``: name ->
    seconds): all of them, unless that pass of the reference took ``ELIMINATE_SECONDS`` or more
    (at such lengths one-time costs are small), when those ``ELIMINATE_FACTOR`` times slower than
    the reference are dropped."""
    ref = warm_up["reference"]
    if ref < ELIMINATE_SECONDS:
        return set(warm_up)
    return {n for n, t in warm_up.items() if n == "reference" or t <= ELIMINATE_FACTOR * ref}


def measure_stages(model, x, candidates, passes=PLAN_PASSES):
    """Seconds per call of the reference and of each implementation in ``candidates`` ({stage:
    [names]}), at the shapes of ``x``, on a copy of ``model`` (its parameters, gradients and
    statistics stay untouched): {stage: {"reference": s, name: s, ...}}. Forward, plus backward
    when gradients are enabled; after one untimed warm-up pass (which may drop clear losers,
    ``survivors``) the candidates alternate and the minimum over ``passes`` timed passes is kept
    (one, where a pass of the reference takes ``LONG_PASS_SECONDS`` or more)."""
    backward = torch.is_grad_enabled()
    with torch.inference_mode(False):
        probe = copy.deepcopy(model)
        probe.fast = False
        x = x.detach().clone()
        inputs = _record_stage_inputs(probe, x)
        timings = {}
        for stage, names in candidates.items():
            inp, (autocast, dtype) = inputs[stage]
            impls = {"reference": getattr(probe, REFERENCE_METHODS[stage]),
                     **{name: IMPLEMENTATIONS[stage][name].__get__(probe) for name in names}}
            run = (inp, autocast, dtype, backward)
            warm_up = {name: _seconds_of(fn, *run) for name, fn in impls.items()}  # untimed: kernels, caches
            impls = {name: fn for name, fn in impls.items() if name in survivors(warm_up)}
            best = {}
            for _ in range(1 if warm_up["reference"] >= LONG_PASS_SECONDS else passes):
                for name, fn in impls.items():
                    best[name] = min(best.get(name, math.inf), _seconds_of(fn, *run))
            timings[stage] = best
    return timings


_measuring = threading.local()


@contextlib.contextmanager
def measuring(enabled):
    """Within ``with measuring(False)``, a plan not yet known is not measured: the reference runs
    (for a job too short to pay for the measurement)."""
    before = getattr(_measuring, "enabled", True)
    _measuring.enabled = enabled
    try:
        yield
    finally:
        _measuring.enabled = before


def planned(model, x, candidates):
    """The plan for this call: this process's, the cache's, or measured now (and stored).

    An nn.DataParallel replica never measures one: its parameters (non-leaf copies) cannot be
    deep-copied, and a backward through it would reach the network's gradients. train_RawNet2.py
    plans the replicas' batch on the network before wrapping it; a plan not found runs the reference.
    """
    replica = getattr(model, "_is_replica", False)
    identity = {**device_identity(x.device), "model": model_identity(model),
                "context": call_context(model, x, candidates)}
    key = plan_key(identity)
    plan = _plans.get(key)
    if plan is not None:
        return plan
    plan, source = lookup(key, identity) if identity["model"] is not None else (None, None)
    if plan is None and replica:
        plan, source = REFERENCE_PLAN, "not planned for nn.DataParallel's replicas: the reference"
    elif plan is None and not getattr(_measuring, "enabled", True):
        plan, source = REFERENCE_PLAN, "not measured for a short job: the reference"
    elif plan is None:
        start = time.perf_counter()
        timings = measure_stages(model, x, candidates) if candidates else {}
        plan = choose(timings)
        seconds = time.perf_counter() - start
        store(key, {"identity": identity, "plan": plan, "timings": timings})
        source = f"measured in {seconds:.1f} s, cached in {cache_path()}"
    _plans[key] = plan
    if identity["model"] is not None:
        ran(key, identity, plan)
    _note(describe(plan, identity["context"], source))
    return plan


# -- segments per forward in TTA extraction ---------------------------------------------------------

CPU_SEGMENT_CANDIDATES = (1, 4, 16, 64)
PLAN_MIN_UTTERANCES = 200  # shorter extractions do not measure plans (they use cached ones, or the reference)
GPU_SEGMENT_CANDIDATES = (64, 128, 256, 512)
GPU_BYTES_PER_SEGMENT = 64 * 2 ** 20  # the reference front end's full-rate maps, the largest need
SEGMENT_STEP_GAIN = 1.1  # the next size is tried only while each size is this much faster than the last
SEGMENT_MIN_GAIN = 1.2  # packing is kept only where it is this much faster than the smallest size
SEGMENT_MIN_SECONDS = 0.25  # each size is timed over at least this long (forwards of a few ms are noisy),
SEGMENT_MAX_PASSES = 24     # or this many forwards


def segment_candidates(device):
    """Segments-per-forward sizes worth timing on ``device``, smallest first: on CPU from 1 (the
    paper model's activations for one segment about fill a CPU's cache) to 64 (small models gain
    from large batches); on GPU large ones, within a quarter of the free memory."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_SEGMENT_CANDIDATES
    free, _ = torch.cuda.mem_get_info(device)
    fits = [n for n in GPU_SEGMENT_CANDIDATES if n * GPU_BYTES_PER_SEGMENT <= free / 4]
    return tuple(fits) or GPU_SEGMENT_CANDIDATES[:1]


def segments(n):
    return f"{n} segment" + ("s" if n != 1 else "")


class SegmentPlan:
    """Segments per forward of a TTA extraction (``size``), measured on its own first forwards:
    each candidate size in turn, smallest first, serves one untimed warm-up forward, then timed
    ones: ``PLAN_PASSES``, more where they took less than ``SEGMENT_MIN_SECONDS`` in all (up to
    ``SEGMENT_MAX_PASSES``; a small model's forward takes a few ms, and the file readers working
    beside it disturb single ones), of which the fastest counts. The next size is tried only
    while each size is ``SEGMENT_STEP_GAIN`` times faster per segment than the one before; then
    the fastest stays, and is cached like the stage plans, except that a larger size than the
    smallest must be ``SEGMENT_MIN_GAIN`` times faster than it: the kernels change with the batch
    size, and with them the float rounding, so the embeddings move away from the one-segment
    loop's only where packing pays clearly (about 1.1x at most for the paper model on a 2-core
    CPU, 1.9x for the demo's). No work is thrown away: every timed forward's embeddings are kept.
    A given ``forced`` size (the scripts' ``-bs``) is used as is; with ``measure`` False (a short
    job) an unknown plan is not measured and the smallest size runs."""

    def __init__(self, model, device, amp, forced=None, candidates=None, measure=True):
        self.size, self.done = forced, forced is not None
        if self.done:
            return
        device = torch.device(device)
        self.candidates = list(candidates or segment_candidates(device))
        self.identity = {**device_identity(device), "model": model_identity(model),
                         "context": {"mode": "extract", "amp": str(amp), "fast": str(model.fast),
                                     "candidates": self.candidates}}
        self.key = plan_key(self.identity)
        plan, source = lookup(self.key, self.identity)
        if plan is not None and "segments_per_forward" in plan:
            self.size, self.done = plan["segments_per_forward"], True
            if self.key not in _plans:
                _plans[self.key] = plan
                _note(f"TTA extraction plan: {segments(self.size)} per forward ({source})")
            ran(self.key, self.identity, plan)
            return
        if not measure:  # a short job: the smallest size, as the one-segment loop on CPU
            self.size, self.done = self.candidates[0], True
            ran(self.key, self.identity, {"segments_per_forward": self.size})
            return
        self.times = {n: [] for n in self.candidates}
        self.seen = dict.fromkeys(self.candidates, 0)
        self.size = self.candidates[0]
        self.start = time.perf_counter()

    def observe(self, size, seconds):
        """Account one forward of ``size`` segments that took ``seconds``."""
        if self.done or size != self.size:  # (a short last forward tells nothing)
            return
        self.seen[size] += 1
        if self.seen[size] > 1:
            self.times[size].append(seconds / size)
        timed = self.times[size]
        if len(timed) < PLAN_PASSES or (sum(timed) * size < SEGMENT_MIN_SECONDS
                                        and len(timed) < SEGMENT_MAX_PASSES):
            return
        per_segment = {n: min(t) for n, t in self.times.items() if len(t) >= PLAN_PASSES}
        tried = [n for n in self.candidates if n in per_segment]
        if (len(tried) < len(self.candidates)
                and (len(tried) == 1 or per_segment[tried[-2]] >= SEGMENT_STEP_GAIN * per_segment[size])):
            self.size = self.candidates[len(tried)]
            return
        best, smallest = min(per_segment, key=per_segment.get), self.candidates[0]
        self.size = best if per_segment[smallest] >= SEGMENT_MIN_GAIN * per_segment[best] else smallest
        self.done = True
        plan = {"segments_per_forward": self.size}
        _plans[self.key] = plan
        ran(self.key, self.identity, plan)
        store(self.key, {"identity": self.identity, "plan": plan, "timings": per_segment})
        _note(f"TTA extraction plan: {segments(self.size)} per forward (measured on the first forwards "
              f"over {time.perf_counter() - self.start:.1f} s, cached in {cache_path()})")
