"""The fast path (fast_RawNet2.py) against the plain reference path: outputs and gradients."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fast_RawNet2
import utils
from conftest import tiny_run_flags, write_speakers
from model_RawNet2 import RawNet2, SincConv


def rel_err(a, b):
    """Relative error of a against b in the 2-norm (the norm of the difference over b's)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def reference_front_end(x, w):
    return F.max_pool1d(torch.abs(F.conv1d(x, w)), 3)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few pooled positions, so that every test crosses chunk boundaries."""
    monkeypatch.setitem(fast_RawNet2.CHUNK_ELEMS, "cpu", 3 * 2 * 4 * 7)


def front_end_grads(fn, x, w, grad_out):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = fn(x, w)
    out.backward(grad_out)
    return out, x.grad, w.grad


FRONT_ENDS = [fast_RawNet2.sinc_abs_maxpool, fast_RawNet2.sinc_abs_maxpool_fft]
FRONT_END_IDS = ["polyphase", "fft"]


@pytest.fixture
def small_fft_chunks(monkeypatch):
    """FFT batch chunks of one utterance, so that the tests cross chunk boundaries."""
    monkeypatch.setitem(fast_RawNet2.FFT_CHUNK_ELEMS, "cpu", 1)


@pytest.mark.parametrize("front_end", FRONT_ENDS, ids=FRONT_END_IDS)
@pytest.mark.parametrize("taps", [51, 50])  # odd like sinc filters, and even
@pytest.mark.parametrize("length", [300, 301, 302, 4000, 4373])  # (T - K + 1) % 3 = 0, 1, 2; longer; prime
def test_front_end_equals_reference_in_float64(small_chunks, small_fft_chunks, front_end, length, taps):
    torch.manual_seed(length)
    x = torch.randn(2, 1, length, dtype=torch.float64)
    w = torch.randn(4, 1, taps, dtype=torch.float64)
    grad_out = torch.randn(2, 4, (length - taps + 1) // 3, dtype=torch.float64)
    for fast, ref in zip(front_end_grads(front_end, x, w, grad_out),
                         front_end_grads(reference_front_end, x, w, grad_out)):
        assert fast.shape == ref.shape and fast.dtype == ref.dtype
        assert rel_err(fast, ref) < 1e-12


@pytest.mark.parametrize("rows", [3, 12, 3072])  # chunks of 1 and 2 pooled positions per utterance; one chunk
@pytest.mark.parametrize("length", [300, 301, 302, 4373])
def test_folded_front_end_equals_reference_for_symmetric_filters(monkeypatch, rows, length):
    monkeypatch.setitem(fast_RawNet2.FOLD_CHUNK_ROWS, "cpu", rows)
    torch.manual_seed(length)
    x = torch.randn(2, 1, length, dtype=torch.float64)
    half = torch.randn(4, 1, 25, dtype=torch.float64)
    w = torch.cat([half, torch.randn(4, 1, 1, dtype=torch.float64), half.flip(-1)], -1)  # 51 taps
    assert fast_RawNet2.symmetric(w) and not fast_RawNet2.symmetric(torch.randn(4, 1, 51))
    with torch.no_grad():
        folded = fast_RawNet2.sinc_abs_maxpool_folded(x, w)
        assert folded.shape == reference_front_end(x, w).shape
        assert rel_err(folded, reference_front_end(x, w)) < 1e-12
    sinc = SincConv(8, 251).filters().detach()  # the real filters: symmetric to the bit
    x = torch.randn(3, 1, 6000)
    with torch.no_grad():
        assert fast_RawNet2.symmetric(sinc)
        assert rel_err(fast_RawNet2.sinc_abs_maxpool_folded(x, sinc), reference_front_end(x, sinc)) < 1e-6


@pytest.mark.parametrize("length", [300, 302, 4373])
def test_fft_forward_without_gradients_equals_reference_in_float64(small_fft_chunks, length):
    torch.manual_seed(length)
    x = torch.randn(3, 1, length, dtype=torch.float64)
    w = torch.randn(4, 1, 51, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(fast_RawNet2.sinc_abs_maxpool_fft(x, w), reference_front_end(x, w)) < 1e-12


def test_fft_length_is_the_next_5_smooth_number():
    def smooth(n):
        for p in (2, 3, 5):
            while n % p == 0:
                n //= p
        return n == 1
    for n in [1, 2, 7, 251, 4373, 16000, 59049, 59050, 100003]:
        assert fast_RawNet2.fft_length(n) == next(m for m in range(n, 3 * n) if smooth(m)), n


@pytest.mark.parametrize("front_end", FRONT_ENDS, ids=FRONT_END_IDS)
def test_front_end_gradient_is_zero_where_the_conv_output_is_zero(small_chunks, front_end):
    # |y| has gradient sign(y) = 0 at y = 0 in torch.abs; a silent stretch of input gives y = 0.
    x = torch.randn(1, 1, 400)
    x[..., 100:300] = 0
    w = torch.randn(3, 1, 11)
    grad_out = torch.ones(1, 3, (400 - 10) // 3)
    fast = front_end_grads(front_end, x, w, grad_out)
    ref = front_end_grads(reference_front_end, x, w, grad_out)
    for a, b in zip(fast, ref):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("layers", [1, 2])
def test_gru_sequence_equals_nn_gru(layers):
    torch.manual_seed(layers)
    gru = torch.nn.GRU(6, 10, num_layers=layers, batch_first=True).double()
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    grad_out = torch.randn(3, 5, 10, dtype=torch.float64)
    results = []
    for fn in (lambda inp: fast_RawNet2.gru_forward(gru, inp), lambda inp: gru(inp)[0]):
        gru.zero_grad()
        inp = x.clone().requires_grad_()
        out = fn(inp)
        out.backward(grad_out)
        results.append([out, inp.grad] + [p.grad.clone() for p in gru.parameters()])
    for fast, ref in zip(*results):
        assert rel_err(fast, ref) < 1e-12


ALL_FAST = {"front_end": "fast", "blocks": "fast", "gru": "fast"}  # every kernel, whatever the rule says


def small_model(legacy, nb_samp=20000):  # last BN sees 9 steps: batch 1 trains sanely
    d_args = {"first_conv": 251, "in_channels": 1, "filts": [16, [16, 16], [16, 24], [24, 24]],
              "nb_fc_node": 12, "gru_node": 12, "nb_gru_layer": 1, "nb_samp": nb_samp, "nb_classes": 7}
    torch.manual_seed(0)
    model = RawNet2(d_args, legacy=legacy)
    model.apply(utils.init_weights)
    return model


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("batch", [1, 3, pytest.param(8, marks=pytest.mark.slow)])
def test_network_training_step_parity(small_chunks, legacy, batch):
    """Logits, every parameter's gradient and the BN statistics of one training step, float32."""
    ref = small_model(legacy).train()
    fast = copy.deepcopy(ref)
    fast_RawNet2.accelerate(fast, ALL_FAST)
    torch.manual_seed(batch)
    x = torch.randn(batch, ref.nb_samp)
    y = torch.randint(0, 7, (batch,))
    for model in (ref, fast):
        F.cross_entropy(model(x), y).backward()
    assert rel_err(fast(x), ref(x)) < 1e-4
    grads = {name: p.grad for name, p in ref.named_parameters()}
    for name, p in fast.named_parameters():
        if grads[name] is None:  # the legacy block's bn1: computed, its output unused
            assert p.grad is None, name
        elif name.endswith("conv1.bias"):
            # conv1 feeds bn2 directly: a train-mode BN removes any constant, so this gradient is
            # exactly 0 in exact arithmetic and float32 noise in both paths; bound it absolutely.
            scale = grads[name.replace("bias", "weight")].abs().max()
            assert p.grad.abs().max() < 1e-4 * scale and grads[name].abs().max() < 1e-4 * scale
        else:
            assert rel_err(p.grad, grads[name]) < 1e-4, name
    buffers = dict(ref.named_buffers())
    for name, b in fast.named_buffers():
        if b.is_floating_point():
            assert rel_err(b, buffers[name]) < 1e-4, name


@pytest.mark.parametrize("legacy", [False, True])
def test_network_embeddings_parity_in_eval(small_chunks, legacy):
    ref = small_model(legacy).eval()
    fast = copy.deepcopy(ref)
    fast_RawNet2.accelerate(fast, ALL_FAST)
    x = torch.randn(5, ref.nb_samp)
    with torch.no_grad():
        assert rel_err(fast.embed(x), ref.embed(x)) < 1e-5


def test_training_after_an_inference_mode_pass(small_chunks):
    model = small_model(False).train()
    fast_RawNet2.accelerate(model, ALL_FAST)
    x = torch.randn(2, model.nb_samp)
    with torch.inference_mode():  # e.g. re-estimating batch-norm statistics
        model(x)
    model(x).sum().backward()  # the reused scratch buffer must not be an inference tensor
    assert all(p.grad is not None for name, p in model.named_parameters() if "bn1" not in name)


def test_double_backward_raises_instead_of_going_wrong(small_chunks):
    model = small_model(False).train()
    fast_RawNet2.accelerate(model, ALL_FAST)
    x = torch.randn(2, model.nb_samp, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward|once_differentiable|differentiable"):
        grad.sum().backward()


def test_non_default_batch_norm_and_gru_fall_back_to_the_modules(small_chunks):
    ref = small_model(False).double().train()
    for module in ref.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.momentum = None  # cumulative average: not what the fused batch norm implements
    ref.gru = torch.nn.GRU(24, 12, bidirectional=True, batch_first=True).double()
    ref.fc1_gru = torch.nn.Linear(24, 12).double()
    fast = copy.deepcopy(ref)
    fast_RawNet2.accelerate(fast, ALL_FAST)
    x = torch.randn(3, ref.nb_samp, dtype=torch.float64)
    for model in (ref, fast):
        model(x).sum().backward()
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        if b.grad is not None and not name.endswith("conv1.bias"):
            assert rel_err(a.grad, b.grad) < 1e-10, name
    for (name, a), b in zip(fast.named_buffers(), ref.buffers()):
        assert rel_err(a.double(), b.double()) < 1e-10, name


@pytest.mark.slow
def test_ddp_on_cpu_prints_no_gradient_stride_warning(tmp_path):
    """The fast path's weight gradients have their parameters' layout, so DistributedDataParallel's
    buckets take them as they are. (Before, at 16 crops per process the 1x1 conv_downsample weights'
    gradients came back in channels-last strides: a warning from DDP's reducer, and a copy.)"""
    from test_distributed import torchrun
    rng = np.random.default_rng(0)
    write_speakers(str(tmp_path / "VoxCeleb2" / "wav"), [f"id0{i:04d}" for i in range(6)], 4, 2, rng)
    test_keys = write_speakers(str(tmp_path / "VoxCeleb1" / "eval_wav"), ["id10000", "id10001"], 1, 2, rng)
    trials = [f"{int(a[:7] == b[:7])} {a} {b}\n" for i, a in enumerate(test_keys) for b in test_keys[i + 1:]]
    (tmp_path / "VoxCeleb1" / "veri_test.txt").write_text("".join(trials))
    flags = tiny_run_flags(str(tmp_path), tmp_path / "out", epochs=1) + [
        "-fast", "blocks=fast", "-bs", "32", "-m_filts", "[32,[32,32],[32,64],[64,64]]"]
    result = torchrun(flags, timeout=240, env={"CUDA_VISIBLE_DEVICES": ""})  # gloo, also on GPU machines
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Grad strides do not match" not in result.stderr + result.stdout
