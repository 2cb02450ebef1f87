"""Fast path of RawNet2: three of its stages with the same math in another order, and the fixed rule
that picks which of them run.

The reference is the plain PyTorch of model_RawNet2.py, which does not know this module:
``FastRawNet2`` subclasses ``RawNet2`` and overrides its three stage methods (``accelerate`` turns a
RawNet2 into one, in place; parameters and state dict unchanged). Outputs and gradients equal the
reference's to float32 rounding (tests/test_fast.py and tests/test_rule.py hold them to 1e-4
relative):

1. The front end, ``max_pool1d(|conv1d(x, filters)|, 3)``, three ways. The reference materialises
   the full-rate map several times (the conv output, its absolute value, max-pool's int64 indices,
   and in backward a zero-filled full-rate gradient and |.|'s sign), each B x C x ~T floats.
   ``sinc_abs_maxpool`` (``fast``) cuts the time axis into chunks; each chunk is convolved (in
   polyphase form, see ``_polyphase_index``), rectified and pooled at once, and only the pooled
   output plus a 1-byte code per pooled value (which of the 3 samples won, and its sign) is kept for
   backward, which rebuilds each chunk's sparse full-rate gradient from those codes and calls the
   convolution's own backward on it. ``sinc_abs_maxpool_fft`` (``fft``) convolves by FFTs, keeping
   the same codes; both gradients are a correlation or convolution with the full-rate gradient,
   summed over channels or batch in the frequency domain, so only B + C inverse transforms are
   needed. ``sinc_abs_maxpool_folded`` (``fold``, no gradients) uses the sinc filters' symmetry:
   each output needs only half the multiplies, x[t + k] + x[t + K - 1 - k] times the first half of
   the taps, as one matrix product per chunk of output samples, rectified and pooled in cache.
2. ``residual_blocks`` (CPU, float32) runs block0..5 in channels-last layout, where mkldnn's
   convolutions are faster, with a GEMM weight gradient and a batch norm whose sums are as
   accurate as the reference kernel's (see the section below).
3. ``gru_forward`` (CPU, float32) is the GRU with all weight gradients in one GEMM each instead of
   an outer product per time step.

Which implementation runs each stage is ``RULES`` (last section): a pure function of facts that do
not change between runs, written from bench/stages.py's measurements (bench/README.md).
"""

import functools
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from tqdm import tqdm

from model_RawNet2 import RawNet2

# Full-rate values (batch x channels x time) per chunk: ~2 MB of float32 on CPU, to stay in cache
# (the best size in bench/train_step.py); on GPU chunks only bound the temporary memory.
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
# CPU, so that the elementwise passes over a chunk (|.|, pooling, codes) run from the caches, which
# made the demo model's training front end faster than chunks four times larger; on GPU chunks only
# bound memory).
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
# mkldnn's convolutions run faster forward on channels-last (B, C, 1, T) tensors than on
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
# The rule: which implementation runs each stage of RawNet2.embed
#
# RawNet2.embed runs three stages through methods of its own: ``sinc_front_end`` (sinc conv ->
# |.| -> max-pool 3), ``residual_stack`` (block0..5) and ``gru_outputs``. ``FastRawNet2`` is the
# same network with those three methods dispatching to the implementations above where RULES says
# so. RULES is a pure function of facts that stay the same from one run to the next (the device,
# the instruction-set class of PyTorch's CPU kernels, the model's shape, the batch, gradients or
# not, the dtype): the same command on the same machine runs the same code, whatever else the
# machine is doing. Each row names the benchmark behind it (bench/stages.py, bench/README.md).

STAGES = ("front_end", "blocks", "gru")
REFERENCE_METHODS = {"front_end": "sinc_front_end", "blocks": "residual_stack", "gru": "gru_outputs"}
REFERENCE = dict.fromkeys(STAGES, "reference")


def fast_front_end(model, x):
    return sinc_abs_maxpool(x, model.first_conv.filters())


def fft_front_end(model, x):
    return sinc_abs_maxpool_fft(x, model.first_conv.filters())


def fold_front_end(model, x):
    filters = model.first_conv.filters()
    if not symmetric(filters):  # (SincConv's always are; anything else gets the direct convolution)
        return F.max_pool1d(torch.abs(F.conv1d(x, filters)), 3)
    return sinc_abs_maxpool_folded(x, filters)


def fast_blocks(model, x):
    return residual_blocks(model, x, model.LEAKY_SLOPE)


def fast_gru(model, x):
    return gru_forward(model.gru, x)


# Each stage's implementations besides the reference, by the name a plan and ``-fast`` give them.
IMPLEMENTATIONS = {"front_end": {"fast": fast_front_end, "fft": fft_front_end, "fold": fold_front_end},
                   "blocks": {"fast": fast_blocks}, "gru": {"fast": fast_gru}}


def cpu_class():
    """The instruction-set class PyTorch's CPU kernels run at here: "avx512", "avx2" or "other"
    (``torch.backends.cpu.get_cpu_capability()``, which ``ATEN_CPU_CAPABILITY`` caps)."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    return next((name for name in ("avx512", "avx2") if capability.startswith(name)), "other")


# The variables that cap the instruction sets of the CPU kernels: PyTorch's own (ATen), oneDNN's
# (convolutions) and MKL's (matrix products). All three at AVX2 make an AVX-512 machine run the
# kernels an AVX2 one runs.
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
# oneDNN caps under which its bfloat16 kernels are emulated (those below AVX512_CORE_BF16).
NO_BF16_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def kernel_settings():
    """The KERNEL_ENV variables set in this process, as one line ("default" if none is)."""
    return ", ".join(f"{k}={os.environ[k]}" for k in KERNEL_ENV if k in os.environ) or "default"


@functools.lru_cache(maxsize=1)
def cpu_flags():
    """The CPU's instruction-set flags (Linux /proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16():
    """Whether bfloat16 runs natively here: the CPU has AVX-512 BF16 or AMX, and oneDNN is not capped
    below them (``ONEDNN_MAX_CPU_ISA``, or the older ``DNNL_MAX_CPU_ISA``). Without it bf16 is
    emulated, and several times slower than float32 (bench/train_step.py)."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags()) and cap not in NO_BF16_ISAS


def tf32_settings():
    """Whether cuDNN's convolutions and CUDA's matrix products may run in TF32 (which changes both
    their speed and their rounding): PyTorch's allow_tf32 flags, or its newer fp32_precision
    settings where those were used (the flags then refuse to be read)."""
    backends = torch.backends
    try:
        return {"conv": backends.cudnn.allow_tf32, "matmul": backends.cuda.matmul.allow_tf32}
    except RuntimeError:
        return {"conv": backends.cudnn.conv.fp32_precision, "matmul": backends.cuda.matmul.fp32_precision}


@dataclass(frozen=True)
class Call:
    """The facts a plan depends on: nothing that changes from one run of a command to the next."""
    device: str        # "cpu" or "cuda"
    cpu: str           # cpu_class() (on GPU too: it names the machine)
    filters: int       # sinc filters (the paper: 128)
    nb_samp: int       # samples per input (the paper: 59,049)
    gru_node: int      # GRU width (the paper: 1024)
    batch: int         # inputs per forward
    grad: bool         # gradients enabled (training)
    dtype: str         # "float32", or the autocast dtype

    @property
    def short_maps(self):
        """Full-rate front-end maps of at most 4 M values per input (16 MB in float32; the paper's
        are 7.6 M): their FFTs stay in a CPU's caches."""
        return self.filters * self.nb_samp <= 2 ** 22

    @property
    def cpu_fp32(self):
        return self.device == "cpu" and self.dtype == "float32"


@dataclass(frozen=True)
class Rule:
    stage: str
    name: str
    when: Callable[[Call], bool]
    implementation: str
    benchmark: str     # the bench script and what it measured there (bench/README.md)


# Per stage, the first row that matches names the implementation; no row: the reference. Ratios are
# the stage's time with the reference over its time with the implementation named (forward, and
# backward where there are gradients), bench/stages.py, on AVX-512 and AVX2 kernels.
RULES = (
    Rule("front_end", "gpu", lambda c: c.device != "cpu", "reference",
         "cuDNN's convolution: no GPU measurement yet justifies another implementation"),
    Rule("front_end", "cpu-train-short-maps", lambda c: c.grad and c.short_maps, "fft",
         "bench/stages.py: demo, batch 32: 4.25x; mid, batch 16: 3.03x"),
    Rule("front_end", "cpu-train", lambda c: c.grad, "fast",
         "bench/stages.py: paper, batch 4: 1.54x (AVX2: 1.51x; fft 1.11x)"),
    Rule("front_end", "cpu-packed-short-maps", lambda c: c.short_maps and c.batch > 1, "fft",
         "bench/stages.py: demo, 16 segments: 1.70x; mid, 4 segments: 1.34x"),
    Rule("front_end", "cpu-eval", lambda c: True, "fold",
         "bench/stages.py: paper, 1 segment: 1.27x (AVX2: 1.56x; fast 0.54x)"),
    Rule("blocks", "cpu-train", lambda c: c.cpu_fp32 and c.grad, "fast",
         "bench/stages.py: paper, batch 4: 1.16x (AVX2: 1.24x); mid, batch 16: 1.35x; demo: 1.17x"),
    Rule("gru", "cpu-train-wide-gru", lambda c: c.cpu_fp32 and c.grad and c.gru_node >= 512, "fast",
         "bench/stages.py: paper (1024), batch 4: 1.63x; mid (512), batch 16: 1.26-1.38x; demo (128): 0.91x"),
)


def call_of(model, batch, device, grad, dtype=None):
    """The Call of a forward of ``batch`` inputs of ``model`` on ``device``; ``dtype``: the
    autocast dtype, None for the parameters' own."""
    device = torch.device(device)
    dtype = dtype if dtype is not None else model.ln.gamma.dtype
    return Call(device=device.type, cpu=cpu_class(), filters=model.first_conv.out_channels,
                nb_samp=model.nb_samp, gru_node=model.gru.hidden_size, batch=batch, grad=grad,
                dtype=str(dtype).removeprefix("torch."))


def call_now(model, x):
    """The Call of ``model.embed(x)`` here and now (gradients and autocast as they are set)."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return call_of(model, x.shape[0], x.device, torch.is_grad_enabled(), dtype)


class Plan(NamedTuple):
    stages: dict       # stage -> implementation name
    why: dict          # stage -> the rule row that chose it, "-fast", or "" (no row: the reference)
    call: Call


def applies(stage, name, call):
    """Whether implementation ``name`` of ``stage`` can run this call: the folded front end has no
    backward; the channels-last blocks and the GRU are float32 CPU code."""
    if name == "reference":
        return True
    if stage == "front_end":
        return name != "fold" or not call.grad
    return call.cpu_fp32


def plan(call, overrides=None):
    """The implementation of each stage for ``call``: the first matching row of RULES, or
    ``overrides`` ({stage: name}, from ``-fast``); an implementation that does not apply to this
    call (``applies``) gives way to the reference."""
    stages, why = {}, {}
    for stage in STAGES:
        rule = next((r for r in RULES if r.stage == stage and r.when(call)), None)
        stages[stage], why[stage] = (rule.implementation, rule.name) if rule else ("reference", "")
        if overrides and stage in overrides:
            stages[stage], why[stage] = overrides[stage], "-fast"
        if not applies(stage, stages[stage], call):
            stages[stage], why[stage] = "reference", f"{stages[stage]} does not apply"
    return Plan(stages, why, call)


def describe(p):
    """One line naming each stage's implementation and the rule row (or flag) that chose it."""
    c = p.call
    mode = "gradients" if c.grad else "no gradients"
    stages = ", ".join(f"{s.replace('_', ' ')} {p.stages[s]}" + (f" ({p.why[s]})" if p.why[s] else "")
                       for s in STAGES)
    return f"RawNet2 fast path ({mode}, batch {c.batch}, {c.dtype}, {c.device} {c.cpu}): {stages}"


class FastRawNet2(RawNet2):
    """RawNet2 whose three stage methods run the implementation the rule picks for each call.

    The same module (parameters, buffers, state dict); only ``sinc_front_end``, ``residual_stack``
    and ``gru_outputs`` differ, and only in the order of the same arithmetic. Made from a RawNet2
    by ``accelerate``; ``fast_overrides`` holds ``-fast``'s stage overrides.
    """

    fast_overrides: dict = {}

    def embed(self, x):
        self._plan = plan(call_now(self, x), self.fast_overrides)
        announce(self._plan)
        return super().embed(x)

    def _stage(self, stage, x):
        name = self._plan.stages[stage]
        if name == "reference":
            return getattr(super(), REFERENCE_METHODS[stage])(x)
        return IMPLEMENTATIONS[stage][name](self, x)

    def sinc_front_end(self, x):
        return self._stage("front_end", x)

    def residual_stack(self, x):
        return self._stage("blocks", x)

    def gru_outputs(self, x):
        return self._stage("gru", x)


_announced = set()  # plan lines said in this process


def announce(p):
    """Print ``describe(p)`` on stderr, once per process (rank 0 only); returns the line."""
    line = describe(p)
    if line not in _announced:
        _announced.add(line)
        if int(os.environ.get("RANK", "0")) == 0:
            tqdm.write(line, file=sys.stderr)
    return line


def accelerate(model, fast=True):
    """``model`` (a RawNet2) running the fast path: ``fast`` True follows RULES, a dict overrides
    stages of it, False gives the plain network of model_RawNet2.py. The module itself is changed
    (its class), not copied: parameters, optimiser state and state dict stay as they are."""
    if fast is False:
        if isinstance(model, FastRawNet2):
            model.__class__ = RawNet2
            for name in ("fast_overrides", "_plan"):
                model.__dict__.pop(name, None)
        return model
    model.__class__ = FastRawNet2
    model.fast_overrides = dict(fast) if isinstance(fast, dict) else {}
    return model


# -- segments per forward in TTA extraction ---------------------------------------------------------

# The front end's full-rate map of one segment (filters x samples x 4 bytes) against a fixed budget
# (never the free memory of the moment): on CPU 512 MB, so the paper model (30 MB per segment) packs
# 16 segments and smaller models 64, the best or within 2 % of the best size measured
# (bench/stages.py --packing_only); on GPU 2 GB.
SEGMENT_BUDGET = {"cpu": 2 ** 29, "cuda": 2 ** 31}
MAX_SEGMENTS = {"cpu": 64, "cuda": 256}


def segments_per_forward(model, device):
    """TTA segments per forward for ``model`` on ``device``: the largest power of 2 whose full-rate
    front-end maps fit SEGMENT_BUDGET, between 1 and MAX_SEGMENTS. A network without a sinc front
    end of its own (an ONNX export run by onnxruntime) counts as the paper's 128 filters."""
    kind = "cpu" if torch.device(device).type == "cpu" else "cuda"
    filters = model.first_conv.out_channels if hasattr(model, "first_conv") else 128
    per_segment = filters * model.nb_samp * 4
    fits = max(1, SEGMENT_BUDGET[kind] // per_segment)
    return min(MAX_SEGMENTS[kind], 1 << (fits.bit_length() - 1))
