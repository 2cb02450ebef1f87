"""Fast path of RawNet2's front end: sinc conv -> |.| -> max-pool 3, fused, with a custom backward.

It replaces, in ``model_RawNet2.RawNet2.embed``, the three reference lines

    y = F.conv1d(x, filters)          # (B, C, T - K + 1): the full-rate map
    y = torch.abs(y)
    y = F.max_pool1d(y, 3)            # (B, C, (T - K + 1) // 3)

and is selected by ``model.fast = True`` (the scripts' ``-fast`` flag). The math is the same: the
same convolution kernels (mkldnn / cuDNN) on the same numbers, the same |.| and the same maximum; only
the order of evaluation changes, so outputs and gradients equal the reference up to float rounding
(tests/test_fast.py holds them to 1e-4 relative; in practice they agree to ~1e-6).

Why it is faster and smaller: the reference materialises the full-rate map several times (the conv
output, its absolute value, max-pool's int64 indices, and in backward a zero-filled full-rate gradient
and |.|'s sign), each B x C x ~T floats: 120 MB per tensor for a CPU batch of 4, 3 GB for the paper's
GPU batch of 100. Here the time axis is cut into chunks small enough to stay in cache; each chunk is
convolved, rectified and pooled at once, and only the pooled output plus a 1-byte code per pooled
value (which of the 3 samples won, and its sign) is kept for backward: 1/12 of one full-rate float map.
Backward rebuilds each chunk's sparse full-rate gradient from those codes and calls the convolution's
own backward on it, so nothing is recomputed and the full map never exists.

Measured in bench/train_step.py (see bench/README.md for the figures and the device).
"""

import torch
import torch.nn.functional as F

# Full-rate values (batch x channels x time) per chunk: ~8 MB of float32 on CPU, to stay in cache;
# on GPU chunks only bound the temporary memory, so they are much larger.
CHUNK_ELEMS = {"cpu": 2 ** 21}
DEFAULT_GPU_CHUNK_ELEMS = 2 ** 28


def _pooled_chunk(batch, channels, pooled_len, device):
    """Pooled positions per chunk for this batch and device (at least 1)."""
    budget = CHUNK_ELEMS.get(device.type, DEFAULT_GPU_CHUNK_ELEMS)
    return max(1, min(pooled_len, budget // (3 * batch * channels)))


class SincAbsMaxPool(torch.autograd.Function):
    """``max_pool1d(|conv1d(x, w)|, 3)`` for one input channel, chunked over time."""

    @staticmethod
    def forward(ctx, x, w):  # x (B, 1, T), w (C, 1, K) -> (B, C, P), P = (T - K + 1) // 3
        batch, _, length = x.shape
        channels, _, taps = w.shape
        pooled_len = (length - taps + 1) // 3
        step = _pooled_chunk(batch, channels, pooled_len, x.device)
        out = x.new_empty(batch, channels, pooled_len)
        # code = +-(1 + offset of the maximum in its window of 3), signed like the conv output there;
        # 0 where that output is exactly 0 (|.|'s gradient is 0 there, as torch.abs's is).
        code = torch.empty(batch, channels, pooled_len, dtype=torch.int8, device=x.device)
        for p0 in range(0, pooled_len, step):
            p1 = min(p0 + step, pooled_len)
            y = F.conv1d(x[:, :, 3 * p0: 3 * p1 + taps - 1], w)        # (B, C, 3 (p1 - p0))
            y = y.view(batch, channels, p1 - p0, 3)
            value, offset = y.abs().max(dim=-1)                         # first maximum, as max_pool1d
            sign = torch.gather(y, -1, offset.unsqueeze(-1)).squeeze(-1).sign()
            out[:, :, p0:p1] = value
            code[:, :, p0:p1] = ((offset + 1) * sign).to(torch.int8)
        ctx.save_for_backward(x, w, code)
        ctx.step = step
        return out

    @staticmethod
    def backward(ctx, grad_out):  # (B, C, P) -> grads of x (B, 1, T) and w (C, 1, K)
        x, w, code = ctx.saved_tensors
        batch, channels, pooled_len = code.shape
        taps = w.shape[-1]
        need_x, need_w = ctx.needs_input_grad
        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = torch.zeros_like(w) if need_w else None
        grad_out = grad_out.contiguous()
        for p0 in range(0, pooled_len, ctx.step):
            p1 = min(p0 + ctx.step, pooled_len)
            c = code[:, :, p0:p1]
            offset = (c.abs().long() - 1).clamp_(min=0).unsqueeze(-1)
            g = (grad_out[:, :, p0:p1] * c.sign()).unsqueeze(-1)       # d|y|/dy = sign(y)
            g_full = torch.zeros(batch, channels, p1 - p0, 3, dtype=grad_out.dtype, device=grad_out.device)
            g_full = g_full.scatter_(-1, offset, g).view(batch, channels, 3 * (p1 - p0))
            x_chunk = x[:, :, 3 * p0: 3 * p1 + taps - 1]
            gx, gw, _ = torch.ops.aten.convolution_backward(
                g_full, x_chunk, w, None, (1,), (0,), (1,), False, (0,), 1, (need_x, need_w, False))
            if need_x:
                grad_x[:, :, 3 * p0: 3 * p1 + taps - 1] += gx
            if need_w:
                grad_w += gw
        return grad_x, grad_w


def sinc_abs_maxpool(x, filters):
    """Fused ``F.max_pool1d(torch.abs(F.conv1d(x, filters)), 3)``: x (B, 1, T), filters (C, 1, K)."""
    return SincAbsMaxPool.apply(x, filters)


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
    """``gru(x)[0]`` for a batch-first ``nn.GRU`` (any number of layers, h0 = 0), by GRUSequence."""
    for layer in range(gru.num_layers):
        x = GRUSequence.apply(x, *(getattr(gru, f"{name}_l{layer}")
                                   for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))
    return x
