"""RawNet1/: pre-processing, both phases, losses, phase-2 initialisation, b-vector back-end, end to end.
Each test checks one behaviour against an independent expectation (hand computation, closed form)."""

import argparse
import json
import math
import os
import pickle
import re
import signal
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn as nn
from scipy.interpolate import interp1d
from scipy.optimize import brentq
from sklearn.metrics import roc_curve

from conftest import ROOT
from reliability_tools import run_forked

sys.path.append(os.path.join(ROOT, "RawNet1"))

import data_RawNet  # noqa: E402
import pre_process_waveforms  # noqa: E402
import runs  # noqa: E402
import train_bvec  # noqa: E402
import train_RawNet  # noqa: E402
from common import DataError  # noqa: E402
from data_RawNet import load_index, pre_emphasis, read_int16  # noqa: E402
from model_RawNet import (  # noqa: E402
    CenterLoss,
    DropoutGRU,
    RawNet,
    RawNetBaseline,
    RawNetPretrain,
    add_lrelu_max_pool3,
    between_speaker_loss,
    init_from_pretrained,
    keras_init,
)

PAPER = {"filts": [128, 128, 256], "nb_blocks": [2, 4], "gru_node": 1024, "nb_code": 128,
         "dropout": 0.5, "gru_dropout": 0.3, "nb_classes": 1211}
SMALL = dict(PAPER, filts=[8, 8, 16], gru_node=12, nb_code=8, nb_classes=5)
TINY_FLAGS = ["-nb_samp", "729", "-m_filts", "[4,4,8]", "-m_blocks", "[1,1]", "-m_gru_node", "8",
              "-m_nb_code", "8", "-bs", "4", "-nb_val_spk", "3", "-epoch_pre", "1",
              "-epoch", "2", "-nb_worker", "0", "-progress", "false"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread avoids thread synchronisation that dominates at this size
    (and stalls badly on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- closed-form parameter counts -------------------------------------------------------------

def conv(i, o, k):
    return i * o * k + o


def bn(c):
    return 2 * c


def block(i, o):
    shortcut = conv(i, o, 1) + bn(o) if i != o else 0
    return conv(i, o, 3) + bn(o) + conv(o, o, 3) + bn(o) + shortcut


def frontend():  # strided conv 128 + BN, 2 blocks of 128, 4 blocks of 256
    return conv(1, 128, 3) + bn(128) + 2 * block(128, 128) + block(128, 256) + 3 * block(256, 256)


def test_phase1_parameter_count_and_shapes():
    # The speaker basis (Keras' spk_basis_loss kernel) has no bias.
    head = block(256, 256) + conv(256, 256, 1) + bn(256) + (256 * 128 + 128) + bn(128) + 128 * 1211
    assert sum(p.numel() for p in RawNetPretrain(PAPER).parameters()) == frontend() + head == 2_362_368
    code, logits = RawNetPretrain(SMALL)(torch.randn(2, 3 ** 9))
    assert code.shape == (2, 8) and logits.shape == (2, 5)


def test_phase2_parameter_count_and_shapes():
    gru = 3 * 1024 * (256 + 1024) + 2 * 3 * 1024
    head = gru + (1024 * 128 + 128) + bn(128) + 128 * 1211
    assert sum(p.numel() for p in RawNet(PAPER).parameters()) == frontend() + head == 5_937_920
    code, logits = RawNet(SMALL)(torch.randn(3, 3 ** 8))
    assert code.shape == (3, 8) and logits.shape == (3, 5)


def test_network_time_axis_matches_the_paper():
    """59,049 samples -> strided conv 19,683 -> six max-pools 27 GRU steps (and 9 frames in phase 1)."""
    frontend_out = RawNet(SMALL).frontend(torch.randn(1, 1, 59049))
    assert frontend_out.shape == (1, 16, 27)
    assert RawNetPretrain(SMALL).pre_block(frontend_out).shape == (1, 16, 9)


def test_vox2_baseline_layout_and_legacy_block_quirk():
    small = RawNetBaseline(dict(SMALL, nb_code=10)).train()
    keys = small.state_dict().keys()
    assert "block0.0.bn1.weight" not in keys and "block0.1.bn1.weight" in keys
    assert "block1.0.conv_downsample.weight" in keys and "block1.1.conv_downsample.weight" not in keys
    assert len(small.block0) == 2 and len(small.block1) == 4 and small.fc1_gru.out_features == 10
    # Legacy quirk: bn1 is computed, but conv1 sees the raw input, so bn1's affine has no effect.
    x = torch.randn(2, 3 ** 8)
    before = small.embed(x)
    with torch.no_grad():
        small.block0[1].bn1.weight.mul_(5.0)
        small.block0[1].bn1.bias.add_(3.0)
    torch.testing.assert_close(small.embed(x), before)


# --- pre-processing ---------------------------------------------------------------------------

def write_wav(path, samples, sr=16000):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, np.asarray(samples, dtype=np.int16), sr, subtype="PCM_16")


def test_pre_emphasis_by_hand(tmp_path):
    write_wav(tmp_path / "a.wav", [1000, 2000, -3000, 5])
    x = read_int16(str(tmp_path / "a.wav"))
    np.testing.assert_array_equal(x, [1000, 2000, -3000, 5])  # int16 scale, not normalised
    np.testing.assert_allclose(pre_emphasis(x), [2000 - 970, -3000 - 1940, 5 + 2910], rtol=1e-6)


def test_pre_processing_writes_skips_silent_and_resumes(tmp_path):
    wavs = tmp_path / "wav"
    write_wav(wavs / "id1/v1/00001.wav", [100, 300, 200])
    write_wav(wavs / "id1/v1/00002.wav", [0, 0, 0, 0])
    args = pre_process_waveforms.parse_args(["-wav_dir", str(wavs), "-out_dir", str(tmp_path / "npy"),
                                             "-nb_worker", "2"])
    lengths, skipped = pre_process_waveforms.main(args, progress=False)
    out = tmp_path / "npy/id1/v1/00001.npy"
    np.testing.assert_allclose(np.load(out), [300 - 97, 200 - 291])
    assert lengths == {"id1/v1/00001.wav": 2} and skipped == ["id1/v1/00002.wav"]
    assert load_index(str(tmp_path / "npy")) == (lengths, skipped)
    # Resume: an existing .npy is kept as it is, a new wav is converted.
    np.save(out, np.array([7.0, 7.0, 7.0], dtype=np.float32))
    write_wav(wavs / "id2/v1/00001.wav", [10, 10])
    lengths, _ = pre_process_waveforms.main(args, progress=False)
    assert lengths == {"id1/v1/00001.wav": 3, "id2/v1/00001.wav": 1}
    np.testing.assert_array_equal(np.load(out), [7, 7, 7])


@pytest.mark.parametrize("data,sr,match", [(np.ones((10, 2)), 16000, "2 channels"),
                                           (np.ones(10), 8000, "8000 Hz")])
def test_pre_processing_rejects_wrong_format_in_one_line(tmp_path, data, sr, match):
    write_wav(tmp_path / "wav/id1/v1/00001.wav", 1000 * data, sr)
    args = pre_process_waveforms.parse_args(["-wav_dir", str(tmp_path / "wav"),
                                             "-out_dir", str(tmp_path / "npy")])
    with pytest.raises(DataError, match=f"00001.wav: .*{match}") as e:
        pre_process_waveforms.main(args, progress=False)
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "npy/index.json")


# --- losses -----------------------------------------------------------------------------------

def test_between_speaker_loss_by_hand():
    """Keras spk_basis_loss, s = 5: each basis vector w becomes w / (|w| / sqrt5 + 1e-4), and the loss is
    the mean of all N^2 entries of their Gram matrix with a zero diagonal."""
    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]], dtype=torch.float64)
    norms = [1.0, 2.0, 3 * math.sqrt(2)]
    length = [n / (n / math.sqrt(5) + 1e-4) for n in norms]          # each just under sqrt(5)
    # cosines: (1,0)-(0,2) = 0, (1,0)-(3,3) = 1/sqrt2, (0,2)-(3,3) = 1/sqrt2; each pair appears twice.
    off_diagonal = 2 * (length[0] * length[2] + length[1] * length[2]) / math.sqrt(2)
    expected = off_diagonal / 9
    assert between_speaker_loss(weight).item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(5 * 2 * (2 / math.sqrt(2)) / 9, rel=1e-3)  # ~5x the mean cosine


def test_center_loss_and_center_update_by_hand():
    center = CenterLoss(3, 2, alpha=0.5)
    center.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]))
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 2.0]])
    labels = torch.tensor([0, 0, 1])
    assert center(x, labels).item() == pytest.approx(0.5 * (1 + 9 + 1))
    center.update(x, labels)
    # class 0: sum(c - x) = (-4, 0), / (1 + 2), c -= 0.5 * that; class 1: (0, -1) / 2; class 2 absent.
    expected = torch.tensor([[2 / 3, 0.0], [1.0, 1.25], [5.0, 5.0]])
    torch.testing.assert_close(center.centers, expected)


@pytest.mark.parametrize("length", [30, 31, 32])
def test_fused_add_lrelu_max_pool_equals_pytorch_ops(length):
    """The training form of a block's end gives max_pool1d(leaky_relu(a + b), 3)'s values and both
    gradients exactly, trailing samples of an incomplete window included."""
    torch.manual_seed(0)
    a = torch.randn(3, 4, length, requires_grad=True)
    b = torch.randn(3, 4, length, requires_grad=True)
    out = add_lrelu_max_pool3(a, b)
    expected = torch.nn.functional.max_pool1d(torch.nn.functional.leaky_relu(a + b, 0.3), 3)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (a, b), grad)
    want = torch.autograd.grad(expected, (a, b), grad)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert not got[0][..., length // 3 * 3:].any()


def test_fused_max_pool_by_hand_ties_zero_and_negative_windows():
    """Hand-made windows: a tie goes to the first sample (as max-pool's), an all-negative window
    passes the gradient times the slope 0.3, a maximum of exactly 0 too (LeakyReLU's gradient at 0)."""
    s = torch.tensor([[[2.0, 2.0, 1.0, -3.0, -1.0, -2.0, 0.0, -1.0, 0.0]]], requires_grad=True)
    out = add_lrelu_max_pool3(s, torch.zeros_like(s))
    assert out.tolist() == [[[2.0, pytest.approx(-0.3), 0.0]]]
    out.backward(torch.tensor([[[1.0, 10.0, 100.0]]]))
    assert s.grad.tolist() == [[[1.0, 0.0, 0.0, 0.0, pytest.approx(3.0), 0.0, pytest.approx(30.0), 0.0, 0.0]]]


def test_gru_unroll_equals_nn_gru_without_dropout():
    torch.manual_seed(0)
    gru = DropoutGRU(6, 5, recurrent_dropout=0.3)
    x = torch.randn(3, 7, 6)
    reference = nn.GRU(6, 5, batch_first=True)
    reference.load_state_dict(gru.state_dict())
    torch.testing.assert_close(gru.unroll(x, torch.ones(3, 3, 5)), reference(x)[0])


def test_gru_recurrent_dropout_has_one_mask_per_gate():
    """Keras' GRU (implementation 1) drops the previous state with a separate mask in each of the
    three gates' recurrent products; the state carried on is not dropped."""
    torch.manual_seed(0)
    gru = DropoutGRU(4, 3, recurrent_dropout=0.5).train()
    x = torch.randn(2, 5, 4)
    masks = gru.draw_masks(x)
    assert masks.shape == (3, 2, 3) and set(masks.unique().tolist()) <= {0.0, 2.0}
    big = gru.draw_masks(torch.zeros(4000, 1, 4))
    assert not torch.equal(big[0], big[1]) and not torch.equal(big[1], big[2])
    assert big.mean().item() == pytest.approx(1.0, abs=0.02)
    # Hand-written step with the three masks, one per gate (PyTorch gate order r, z, n).
    w_ih, w_hh = gru.weight_ih_l0.detach(), gru.weight_hh_l0.detach()
    b_ih, b_hh = gru.bias_ih_l0.detach(), gru.bias_hh_l0.detach()
    h, outputs = torch.zeros(2, 3), []
    for t in range(5):
        gx = x[:, t] @ w_ih.t() + b_ih
        gh = [(h * masks[g]) @ w_hh[3 * g:3 * g + 3].t() + b_hh[3 * g:3 * g + 3] for g in range(3)]
        r = torch.sigmoid(gx[:, 0:3] + gh[0])
        z = torch.sigmoid(gx[:, 3:6] + gh[1])
        n = torch.tanh(gx[:, 6:9] + r * gh[2])
        h = (1 - z) * n + z * h
        outputs.append(h)
    torch.testing.assert_close(gru.unroll(x, masks), torch.stack(outputs, 1))


# --- phase-2 initialisation ---------------------------------------------------------------------

def test_phase2_inherits_only_the_layers_keras_names_alike():
    """Keras load_weights(by_name=True): phase 2 shares names with phase 1 only for 'strided_conv' and
    'res_conv_block_1..6_*'; the BN after the strided conv, the dense embedding layer and its BN, the
    speaker basis and the centers start afresh."""
    torch.manual_seed(1)
    phase1 = RawNetPretrain(SMALL).state_dict()
    torch.manual_seed(2)
    phase2 = RawNet(SMALL)
    before = {k: v.clone() for k, v in phase2.state_dict().items()}
    copied, kept = init_from_pretrained(phase2, phase1)
    after = phase2.state_dict()
    blocks = [f"frontend.blocks.{i}.{layer}.{t}" for i in range(6)
              for layer in ("conv1", "conv2") for t in ("weight", "bias")]
    blocks += [f"frontend.blocks.{i}.{layer}.{t}" for i in range(6) for layer in ("bn1", "bn2")
               for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    blocks += [f"frontend.blocks.2.{layer}.{t}" for layer, ts in
               (("conv_shortcut", ("weight", "bias")),
                ("bn_shortcut", ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")))
               for t in ts]
    assert sorted(copied) == sorted(["frontend.first_conv.weight", "frontend.first_conv.bias"] + blocks)
    assert {k.rsplit(".", 1)[0] for k in kept} == {"frontend.first_bn", "gru", "fc_code", "bn_code", "fc_out"}
    for k in copied:
        assert torch.equal(after[k], phase1[k]), k
    for k in kept:
        assert torch.equal(after[k], before[k]), k


# --- b-vector ---------------------------------------------------------------------------------

def test_bvector_pairs_are_balanced_with_distinct_same_speakers():
    sizes = [1] + [2, 3, 5] * 23                                      # 70 speakers, 69 with two or more
    speaker = np.repeat(np.arange(len(sizes)), sizes)
    speaker_rows = [np.flatnonzero(speaker == s) for s in range(len(sizes))]
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b, labels = train_bvec.balanced_pairs(speaker_rows, 120, rng)
        assert len(labels) == 120 and labels.sum() == 60
        same = speaker[a] == speaker[b]
        np.testing.assert_array_equal(same, labels == 1)
        assert np.all(a[labels == 1] != b[labels == 1])                # two different utterances
        assert len(set(speaker[a[labels == 1]])) == 60                 # of 60 distinct speakers


def test_bvector_optimiser_is_keras_adam_amsgrad_decay_and_l2():
    """The Keras b-vector: Adam(lr 0.001, decay 1e-4, amsgrad), l2(5e-5) on every dense kernel, kernels
    RandomUniform(-0.05, 0.05), zero biases; 1,000 epochs of 1,000 batches."""
    args = train_bvec.parse_args(["-embeddings", "x.pk", "-m_hidden", "6"])
    assert (args.epoch, args.nb_batch_per_epoch, args.bs, args.lr, args.lr_decay, args.wd, args.amsgrad) == \
        (1000, 1000, 120, 0.001, 1e-4, 5e-5, True)
    torch.manual_seed(0)
    model, optimizer, scheduler = train_bvec.make_training(4, args)
    kernels = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(kernels) == 5 and all(g["amsgrad"] for g in optimizer.param_groups)
    decayed = [g for g in optimizer.param_groups if g["weight_decay"]]
    assert len(decayed) == 1 and decayed[0]["weight_decay"] == pytest.approx(2 * 5e-5)
    assert {id(p) for p in decayed[0]["params"]} == {id(k) for k in kernels}
    for m in model.modules():
        if isinstance(m, nn.Linear):
            assert m.weight.abs().max() <= 0.05 and torch.all(m.bias == 0)
    # The same steps as an explicit Keras loss: cross-entropy + 5e-5 * sum of squared kernels, at
    # lr / (1 + 1e-4 k).
    reference = train_bvec.BVectorDNN(4, 6).eval()
    reference.load_state_dict(model.state_dict())
    model.eval()
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.001, amsgrad=True)
    a, b, y = torch.randn(8, 4), torch.randn(8, 4), torch.tensor([0, 1] * 4)
    for k in range(3):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001 / (1 + 1e-4 * k))
        for g in ref_opt.param_groups:
            g["lr"] = 0.001 / (1 + 1e-4 * k)
        l2 = sum(m.weight.pow(2).sum() for m in reference.modules() if isinstance(m, nn.Linear))
        for net, opt, extra in ((model, optimizer, 0.0), (reference, ref_opt, 5e-5 * l2)):
            loss = nn.functional.cross_entropy(net(a, b), y) + extra
            opt.zero_grad()
            loss.backward()
            opt.step()
        scheduler.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


def test_bvector_dropout_thresholds_uniform_noise_as_keras():
    """Keras' dropout: keep where u >= rate for u ~ U[0, 1), kept values times 1 / (1 - rate), the
    gradient through the same mask; the identity in eval mode."""
    drop = train_bvec.UniformDropout(0.25)
    x = torch.randn(400, 300, requires_grad=True)
    torch.manual_seed(3)
    out = drop(x)
    torch.manual_seed(3)
    keep = torch.rand(400, 300) >= 0.25
    torch.testing.assert_close(out, torch.where(keep, x / 0.75, torch.zeros(())))
    assert keep.float().mean().item() == pytest.approx(0.75, abs=0.01)
    out.sum().backward()
    torch.testing.assert_close(x.grad, keep / 0.75)
    assert drop.eval()(x) is x
    assert all(not isinstance(m, nn.Dropout) for m in train_bvec.BVectorDNN(4).modules())


def test_bvector_input_is_sum_difference_product():
    model = train_bvec.BVectorDNN(2, hidden=3, nb_layer=1).eval()
    seen = []
    model.hidden[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    model(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 5.0]]))
    torch.testing.assert_close(seen[0], torch.tensor([[4.0, 7.0, -2.0, -3.0, 3.0, 10.0]]))


# --- initialisation, defaults, schedules -------------------------------------------------------

def test_keras_he_normal_initialisation():
    """Keras 2.2 he_normal: truncated at 2 standard deviations of the underlying normal and rescaled
    so that the samples' standard deviation is sqrt(2 / fan_in); biases zero."""
    torch.manual_seed(0)
    for module, fan_in in ((nn.Conv1d(256, 256, 3), 256 * 3), (nn.Linear(128, 1211, bias=False), 128),
                           (nn.Conv1d(1, 128, 3), 3)):
        keras_init(module)
        w = module.weight.detach().double()
        target = math.sqrt(2 / fan_in)
        assert w.std().item() == pytest.approx(target, rel=0.03 if w.numel() > 1e5 else 0.1)
        assert w.abs().max().item() <= 2 * target / 0.87962566103423978 + 1e-7
        assert module.bias is None or torch.all(module.bias == 0)
    model = RawNet(SMALL)
    model.apply(keras_init)
    assert model.fc_out.bias is None                                  # the speaker basis has no bias
    basis = model.fc_out.weight.detach().double()                     # (5, 8): fan_in 8
    assert basis.abs().max().item() <= 2 * math.sqrt(2 / 8) / 0.87962566103423978 + 1e-7


def test_epoch_defaults_are_the_yaml_values():
    args = train_RawNet.parse_args(["-name", "x"])
    assert (args.epoch_pre, args.epoch, args.lr_decay_pre, args.lr_decay) == (100, 100, 0.0, 1e-4)
    demo = train_RawNet.parse_args(["-name", "x", "-demo"])
    assert (demo.epoch_pre, demo.epoch) == (4, 8)                     # the demo's own scaled-down run
    assert (args.eval_every, demo.eval_every) == (1, 0)             # Vox1-O every epoch; demo: the end


def test_baseline_scheduler_steps_before_the_optimiser_as_the_pytorch_code():
    """The PyTorch baseline calls lr_scheduler.step() before optimizer.step(): its k-th update already
    uses 1 / (1 + 5e-5 (k + 1)). Run that loop literally and compare the rates each update sees."""
    decay = 5e-5
    args = train_RawNet.parse_args(["-name", "x", "-recipe", "vox2_baseline"])
    phase = train_RawNet.make_phases(args)[0]

    def rates(step_first, make):
        p = nn.Parameter(torch.zeros(1))
        opt = torch.optim.Adam([p], lr=0.001)
        sched = make(opt)
        seen = []
        for _ in range(4):
            if step_first:
                sched.step()
            seen.append(opt.param_groups[0]["lr"])
            p.grad = torch.ones(1)
            opt.step()
            if not step_first:
                sched.step()
        return seen

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                               # PyTorch warns about that order
        theirs = rates(True, lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + decay * s)))
    ours = rates(False, lambda o: train_RawNet.keras_decay_scheduler(o, phase.lr_decay, phase.decay_offset))
    assert ours == pytest.approx(theirs) and theirs[0] == pytest.approx(0.001 / (1 + decay))
    keras = rates(False, lambda o: train_RawNet.keras_decay_scheduler(o, 1e-4))  # Keras: update k uses k
    assert keras == pytest.approx([0.001 / (1 + 1e-4 * k) for k in range(4)])


def test_vox2_baseline_parameter_count_with_every_prepared_vox2_speaker():
    def legacy(i, o, first=False):
        shortcut = conv(i, o, 1) if i != o else 0
        return (0 if first else bn(i)) + conv(i, o, 3) + bn(o) + conv(o, o, 3) + shortcut
    body = conv(1, 128, 3) + bn(128) + legacy(128, 128, True) + legacy(128, 128) + legacy(128, 256)
    body += 3 * legacy(256, 256) + bn(256) + 3 * 1024 * (256 + 1024) + 2 * 3 * 1024 + 1024 * 1024 + 1024
    d_args = dict(PAPER, nb_code=1024, nb_classes=6112)  # VoxCeleb2 dev + test, as DB/VoxCeleb2/wav/
    total = body + 1024 * 6112 + 6112
    assert sum(p.numel() for p in RawNetBaseline(d_args).parameters()) == total == 12_965_344


# --- validation trials ------------------------------------------------------------------------

def test_per_utterance_trials_have_the_voxceleb1_val_layout():
    """As the Keras list: 8 lines per utterance, alternating target / non-target; partners drawn with
    replacement (targets among all of the speaker's utterances, itself included; non-targets via a
    uniformly drawn other speaker)."""
    sizes = [2, 10, 30]
    keys = [f"id{s}/v/{u:05d}.wav" for s, n in enumerate(sizes) for u in range(n)]
    lines = data_RawNet.per_utterance_trials(keys, np.random.default_rng(0))
    assert len(lines) == 8 * len(keys)
    self_pairs, impostor_speakers = 0, []
    for i, key in enumerate(keys):
        chunk = [line.split() for line in lines[8 * i:8 * i + 8]]
        assert [c[0] for c in chunk] == list("10101010") and all(c[1] == key for c in chunk)
        assert all(c[2].split("/")[0] == key.split("/")[0] for c in chunk if c[0] == "1")
        assert all(c[2].split("/")[0] != key.split("/")[0] for c in chunk if c[0] == "0")
        self_pairs += sum(c[2] == key for c in chunk if c[0] == "1")
        impostor_speakers += [c[2].split("/")[0] for c in chunk if c[0] == "0" and c[1].startswith("id2/")]
    # Expected self pairs: 4 per utterance x 1 / (its speaker's size) = 4 x 3 speakers = 12.
    assert 3 <= self_pairs <= 24
    # Utterances of the 30-utterance speaker pick the 2- and 10-utterance speakers equally often.
    assert abs(impostor_speakers.count("id0") - impostor_speakers.count("id1")) < 30


def test_validation_speakers_stay_in_training_and_count():
    keys = [f"id{s:02d}/v/{u:05d}.wav" for s in range(50) for u in range(3)]
    val = data_RawNet.validation_speakers(keys, 40, seed=3)
    assert len({k.split("/")[0] for k in val}) == 40 and set(val) <= set(keys) and len(val) == 120
    assert data_RawNet.validation_speakers(keys, 40, seed=3) == val
    assert data_RawNet.validation_speakers(keys, 0, seed=3) == keys


def test_first_release_vox1_keys_are_translated(tmp_path):
    """The Keras lists name files '<name>/<video>_<NNNNNNN>.wav' (first VoxCeleb1 release); e.g. its
    first Vox1-O line is veri_test.txt's 'id10270/x6uYqmx31kE/00001.wav id10270/8jEAjG6SegY/00008.wav'."""
    meta = tmp_path / "vox1_meta.csv"
    meta.write_text("VoxCeleb1 ID\tVGGFace1 ID\tGender\tNationality\tSet\n"
                    "id10270\tEartha_Kitt\tf\tUSA\ttest\nid10300\tElizabeth_Banks\tf\tUSA\ttest\n")
    trials = tmp_path / "val.txt"
    trials.write_text("1 Eartha_Kitt/x6uYqmx31kE_0000001.wav Eartha_Kitt/8jEAjG6SegY_0000008.wav\n"
                      "0 Eartha_Kitt/x6uYqmx31kE_0000001.wav Elizabeth_Banks/a_b-c_0000123.wav\n")
    lines = data_RawNet.read_trial_lines(str(trials), data_RawNet.read_vox1_meta(str(meta)))
    assert lines == ["1 id10270/x6uYqmx31kE/00001 id10270/8jEAjG6SegY/00008",
                     "0 id10270/x6uYqmx31kE/00001 id10300/a_b-c/00123"]
    trials.write_text("1 Nobody/x_0000001.wav Eartha_Kitt/8jEAjG6SegY_0000008.wav\n")
    with pytest.raises(DataError, match="Nobody/x_0000001"):
        data_RawNet.read_trial_lines(str(trials), data_RawNet.read_vox1_meta(str(meta)))


@pytest.mark.parametrize("folders", ["", "spk", "spk/vid/take"])
def test_a_wav_not_at_speaker_video_depth_is_one_line(tmp_path, folders):
    os.makedirs(tmp_path / "wav" / folders, exist_ok=True)
    sf.write(tmp_path / "wav" / folders / "00001.wav", np.ones(400) * 0.1, 16000)
    args = pre_process_waveforms.parse_args(["-wav_dir", str(tmp_path / "wav"),
                                             "-out_dir", str(tmp_path / "npy")])
    with pytest.raises(DataError, match=r"00001.wav: not at <speaker>/<video>/<NNNNN>.wav below"):
        pre_process_waveforms.main(args, progress=False)
    assert not os.path.exists(tmp_path / "npy")


@pytest.mark.parametrize("coef", ["nan", "inf", "1.5", "-0.5"])
def test_a_pre_emphasis_coefficient_outside_0_to_1_is_one_line(tmp_path, coef):
    args = pre_process_waveforms.parse_args(["-wav_dir", str(tmp_path), "-out_dir", str(tmp_path / "npy"),
                                             "-coef", coef])
    with pytest.raises(DataError, match=rf"^-coef {coef}: a pre-emphasis coefficient must be from 0 to 1"):
        pre_process_waveforms.main(args, progress=False)


def test_a_rerun_with_another_coef_into_a_finished_folder_is_refused(tmp_path):
    os.makedirs(tmp_path / "wav" / "spk" / "vid")
    sf.write(tmp_path / "wav" / "spk" / "vid" / "00001.wav", np.ones(400) * 0.1, 16000)
    flags = ["-wav_dir", str(tmp_path / "wav"), "-out_dir", str(tmp_path / "npy")]
    pre_process_waveforms.main(pre_process_waveforms.parse_args(flags), progress=False)
    before = np.load(tmp_path / "npy" / "spk" / "vid" / "00001.npy")
    with pytest.raises(DataError, match=r"npy: holds the conversion of .*wav with -coef 0.97; delete it"):
        pre_process_waveforms.main(pre_process_waveforms.parse_args(flags + ["-coef", "0.5"]), progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "npy" / "spk" / "vid" / "00001.npy"), before)


@pytest.mark.parametrize("flag, value, why", [
    ("seed", "-1", "must be from 0 to 2**32 - 1"), ("bs", "0", "must be at least 1"),
    ("lr", "nan", "must be a positive number"), ("m_nb_code", "0", "must be at least 1"),
    ("m_dropout", "2", "must be from 0 to 1"), ("nb_val_trial", "-3", "must be 0 or a trial count"),
    ("nb_worker", "-1", "must not be negative")])
def test_flags_no_rawnet1_run_can_use_are_one_line(tmp_path, flag, value, why):
    args = train_RawNet.parse_args(["-name", "run", "-save_dir", str(tmp_path), f"-{flag}", value])
    with pytest.raises(DataError, match=re.escape(f"-{flag} {getattr(args, flag)}: {why}")):
        train_RawNet.main(args)
    assert not os.listdir(tmp_path)


def test_a_damaged_index_or_npy_is_one_line(tmp_path):
    (tmp_path / "index.json").write_text("{")
    with pytest.raises(DataError, match=r"index.json: not the index RawNet1/pre_process_waveforms.py writes"):
        data_RawNet.load_index(str(tmp_path))
    os.makedirs(tmp_path / "spk" / "vid")
    (tmp_path / "spk" / "vid" / "00001.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(DataError, match=r"00001.npy: not a readable .npy"):
        data_RawNet.load_npy(str(tmp_path), "spk/vid/00001.wav")


@pytest.mark.parametrize("flag, value, why", [
    ("seed", "-1", "must be from 0 to 2**32 - 1"), ("lr_decay", "-1", "must be a number >= 0"),
    ("m_hidden", "0", "must be at least 1"), ("m_nb_layer", "-1", "must not be negative"),
    ("m_in_dropout", "2", "must be from 0 to below 1"), ("nb_val_spk", "-1", "must be 0 (all)")])
def test_flags_no_bvector_run_can_use_are_one_line(tmp_path, flag, value, why):
    args = train_bvec.parse_args(["-embeddings", str(tmp_path / "e.pk"), f"-{flag}", value])
    with pytest.raises(DataError, match=re.escape(f"-{flag} {getattr(args, flag)}: {why}")):
        train_bvec.main(args)
    assert not os.listdir(tmp_path)


# --- end to end -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def npy_corpus(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("npy")
    for wav_dir, name in (("VoxCeleb2/wav", "dev"), ("VoxCeleb1/eval_wav", "eval")):
        pre_process_waveforms.main(pre_process_waveforms.parse_args(
            ["-wav_dir", os.path.join(tiny_corpus, wav_dir), "-out_dir", str(out / name), "-nb_worker", "1"]),
            progress=False)
    return {"dev": str(out / "dev"), "eval": str(out / "eval"),
            "trials": os.path.join(tiny_corpus, "VoxCeleb1", "veri_test.txt")}


def run_flags(npy_corpus, save_dir, name="run"):
    return ["-name", name, "-save_dir", str(save_dir), "-dev_dir", npy_corpus["dev"],
            "-eval_dir", npy_corpus["eval"], "-trials", npy_corpus["trials"]] + TINY_FLAGS


def eer_by_hand(labels, scores):
    """EER as the authors' scripts compute it: sklearn's ROC, then brentq on 1 - x - tpr(x)."""
    fpr, tpr, _ = roc_curve(labels, scores, pos_label=1)
    return brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0)


def test_end_to_end_writes_pickle_and_both_eers(npy_corpus, tmp_path, capsys):
    train_RawNet.main(train_RawNet.parse_args(run_flags(npy_corpus, tmp_path)))
    out = tmp_path / "run"
    printed = capsys.readouterr().out
    eers = (out / "eers.txt").read_text().splitlines()
    assert [line.split(", ")[:2] for line in eers] == [["phase:pretrain", "epoch:0"],
                                                       ["phase:gru", "epoch:0"], ["phase:gru", "epoch:1"]]
    line_format = r"phase:\w+, epoch:\d, val_eer:\d\.\d{4}, eval_eer:\d\.\d{4}"
    assert all(re.fullmatch(line_format, line) for line in eers)
    # Every dev speaker trains (6 classes); 3 of them also give the validation trials, 8 per utterance.
    best = torch.load(out / "models" / "gru_best.pt", weights_only=True)
    assert best["model"]["fc_out.weight"].shape == (6, 8)
    val_lines = (out / "val_trial.txt").read_text().splitlines()
    assert len(val_lines) == 12 * 8 and len({line.split()[1].split("/")[0] for line in val_lines}) == 3
    assert "initialised afresh: bn_code, fc_code, fc_out, frontend.first_bn, gru, centers" in printed
    with open(out / "embeddings.pk", "rb") as f:
        embeddings = pickle.load(f)
    assert set(embeddings) == {"dev_dic_embeddings", "eval_dic_embeddings"}
    assert len(embeddings["dev_dic_embeddings"]) == 24 and len(embeddings["eval_dic_embeddings"]) == 12
    vector = embeddings["eval_dic_embeddings"]["id10000/vid00000000/00001"]  # id without .wav
    assert vector.shape == (8,) and vector.dtype == np.float32

    eers = train_bvec.main(train_bvec.parse_args(
        ["-embeddings", str(out / "embeddings.pk"), "-trials", npy_corpus["trials"], "-epoch", "2",
         "-nb_batch_per_epoch", "3", "-bs", "8", "-m_hidden", "16", "-progress", "false"]))
    # Both EERs recomputed from the embeddings and the written scores.
    test = embeddings["eval_dic_embeddings"]
    pairs = [line.split() for line in open(npy_corpus["trials"])]
    labels = np.array([int(p[0]) for p in pairs])
    vectors = [(test[a.removesuffix(".wav")], test[b.removesuffix(".wav")]) for _, a, b in pairs]
    cosine = [float(np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v)) for u, v in vectors]
    assert eers["cosine"] == pytest.approx(eer_by_hand(labels, cosine), abs=1e-9)
    written = np.loadtxt(out / "bvec" / "results" / "bvec_eval.txt")
    np.testing.assert_array_equal(written[:, 1], labels)
    assert eers["bvec"] == pytest.approx(eer_by_hand(labels, written[:, 0]), abs=1e-6)
    assert re.search(r"cosine EER \d+\.\d\d %, b-vector EER \d+\.\d\d %", capsys.readouterr().out)
    assert (out / "bvec" / "eers.txt").read_text().splitlines()[-1].startswith("test cosine_eer:")


def test_missing_trial_key_is_one_line(npy_corpus, tmp_path):
    trials = tmp_path / "trials.txt"
    trials.write_text("1 id10000/vid00000000/00001.wav id19999/none/00001.wav\n")
    flags = run_flags(dict(npy_corpus, trials=str(trials)), tmp_path)
    with pytest.raises(DataError, match=r"1 trial keys .* have no audio/embedding, e.g. id19999/none/00001$"):
        train_RawNet.main(train_RawNet.parse_args(flags))


def test_missing_preprocessed_folder_names_the_fix(npy_corpus, tmp_path):
    flags = run_flags(dict(npy_corpus, dev=str(tmp_path / "nowhere")), tmp_path)
    with pytest.raises(DataError, match="nowhere: no index.json; run RawNet1/pre_process_waveforms.py"):
        train_RawNet.main(train_RawNet.parse_args(flags))


def test_eval_every_scores_vox1_o_in_those_epochs_only_and_changes_no_training(npy_corpus, tmp_path):
    train_RawNet.main(train_RawNet.parse_args(run_flags(npy_corpus, tmp_path, name="every")))
    train_RawNet.main(train_RawNet.parse_args(run_flags(npy_corpus, tmp_path, name="second")
                                              + ["-eval_every", "2"]))
    every = (tmp_path / "every" / "eers.txt").read_text().splitlines()
    second = (tmp_path / "second" / "eers.txt").read_text().splitlines()
    # pretrain epoch 0 and gru epoch 0 are not scored, gru epoch 1 is; the validation EERs are the same
    assert second == [every[0].split(", eval_eer")[0], every[1].split(", eval_eer")[0], every[2]]
    assert sorted(p.name for p in (tmp_path / "second" / "results").iterdir()) == ["gru_eval_epoch1.txt"]
    for name in ("pretrain_best.pt", "gru_best.pt"):
        a, b = (torch.load(tmp_path / run / "models" / name, weights_only=True)
                for run in ("every", "second"))
        assert a["epoch"] == b["epoch"] and a["val_eer"] == b["val_eer"]
        for k, v in a["model"].items():
            torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0, msg=k)
    with pytest.raises(DataError, match="-eval_every must be 0"):
        train_RawNet.main(train_RawNet.parse_args(run_flags(npy_corpus, tmp_path, name="bad")
                                                  + ["-eval_every", "-1"]))


@pytest.mark.parametrize("stop_at", ["gru epoch 0", "gru epoch 1"])  # at the phase boundary, mid-phase
def test_resume_continues_exactly(npy_corpus, tmp_path, monkeypatch, stop_at):
    train_RawNet.main(train_RawNet.parse_args(run_flags(npy_corpus, tmp_path, name="full")))
    train_epoch = train_RawNet.train_epoch

    def interrupted(*args):
        if args[-1] == stop_at:
            raise KeyboardInterrupt
        return train_epoch(*args)

    monkeypatch.setattr(train_RawNet, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_RawNet.main(train_RawNet.parse_args(run_flags(npy_corpus, tmp_path, name="cut")))
    monkeypatch.setattr(train_RawNet, "train_epoch", train_epoch)
    train_RawNet.main(train_RawNet.parse_args(run_flags(npy_corpus, tmp_path, name="cut") + ["-resume"]))
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert (resumed["phase"], resumed["epoch"]) == (full["phase"], full["epoch"]) == (1, 1)
    for k, v in full["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, msg=k)
    torch.testing.assert_close(resumed["center"]["centers"], full["center"]["centers"])
    assert (tmp_path / "full" / "eers.txt").read_text() == (tmp_path / "cut" / "eers.txt").read_text()


def test_vox2_baseline_recipe_defaults_and_run(npy_corpus, tmp_path):
    args = train_RawNet.parse_args(["-name", "x", "-recipe", "vox2_baseline"])
    optimisation = (args.bs, args.epoch, args.lr, args.lr_decay, args.wd, args.amsgrad)
    assert optimisation == (120, 40, 0.001, 5e-5, 1e-4, True)
    model = (args.bs_lambda, args.c_lambda, args.m_gru_node, args.m_nb_code, args.nb_samp)
    assert model == (0, 0, 1024, 1024, 59049)
    validation = (args.nb_val_spk, args.nb_val_trial, args.val_crop, args.val_dir)
    assert validation == (0, 40000, True, "DB/VoxCeleb1/dev_npy/")
    flags = run_flags(npy_corpus, tmp_path) + ["-recipe", "vox2_baseline", "-val_dir", npy_corpus["eval"],
                                               "-nb_val_trial", "40"]
    train_RawNet.main(train_RawNet.parse_args(flags))
    eers = (tmp_path / "run" / "eers.txt").read_text().splitlines()
    assert [line.split(", ")[0] for line in eers] == ["phase:baseline"] * 2
    state = torch.load(tmp_path / "run" / "models" / "baseline_best.pt", weights_only=True)["model"]
    assert set(state) >= {"first_conv.weight", "block1.0.bn1.weight", "block1.0.conv_downsample.weight"}
    dev_speakers = {k.split("/")[0] for k in load_index(npy_corpus["dev"])[0]}
    assert state["fc2_gru.weight"].shape[0] == len(dev_speakers) == 6  # every training speaker is a class
    val_lines = (tmp_path / "run" / "val_trial.txt").read_text().splitlines()
    assert len(val_lines) == 40 and {line.split()[1].split("/")[0] for line in val_lines} <= {
        k.split("/")[0] for k in load_index(npy_corpus["eval"])[0]}


def test_keras_l2_equals_coupled_weight_decay_on_kernels():
    """Keras' l2(wd) on kernels adds wd * sum(w^2) to the loss; our optimiser must take the same step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 3, 3), nn.BatchNorm1d(3))
    keras = nn.Sequential(nn.Conv1d(1, 3, 3), nn.BatchNorm1d(3))
    keras.load_state_dict(model.state_dict())
    x = torch.randn(4, 1, 9)
    args = train_RawNet.parse_args(["-name", "x"])
    ours = train_RawNet.make_optimizer(model, args)
    reference = torch.optim.Adam(keras.parameters(), lr=args.lr, amsgrad=True)
    for _ in range(3):
        for net, opt, l2 in ((model, ours, 0.0), (keras, reference, args.wd)):
            loss = net(x).pow(2).mean() + l2 * net[0].weight.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for a, b in zip(model.parameters(), keras.parameters()):
        torch.testing.assert_close(a, b)


def test_the_channels_last_front_end_runs_by_a_rule_of_the_device_and_mode(monkeypatch):
    model = RawNet(SMALL).eval()
    used = []
    monkeypatch.setattr(type(model.frontend), "forward_channels_last", lambda self, x: used.append(1) or x)
    model.frontend(torch.zeros(1, 1, 2916))
    assert used == [1]  # eval on CPU
    model.frontend.channels_last = False
    model.frontend(torch.zeros(1, 1, 2916))
    assert used == [1]  # forced off
    model.frontend.channels_last = None
    model.train()
    model.frontend(torch.randn(2, 1, 2916))
    assert used == [1]  # training: the reference


@pytest.mark.parametrize("cls", [RawNetPretrain, RawNet])
@pytest.mark.parametrize("batch, length", [(1, 3 ** 6 * 4), (2, 3 ** 6 * 4 + 5)])
def test_channels_last_front_end_equals_the_reference_in_eval(cls, batch, length):
    """The eval-mode channels-last front end (the CPU's eval-mode rule) gives the
    reference's embeddings to float rounding, trailing samples of an incomplete window included."""
    torch.manual_seed(0)
    model = cls(dict(SMALL, nb_blocks=[1, 3]))
    model.apply(keras_init)
    for m in model.modules():  # running statistics other than the initial 0 / 1
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(batch, length) * 1000
    with torch.no_grad():
        model.frontend.channels_last = False
        reference = model.embed(x)
        model.frontend.channels_last = True
        fast = model.embed(x)
        frames = model.frontend(x.unsqueeze(1))
    model.frontend.channels_last = False
    assert frames.shape == (batch, 16, length // 3 ** 5) and frames.stride(1) == 1  # channels last
    assert (fast - reference).abs().max() <= 1e-5 * reference.abs().max()
    model.train()
    x = torch.randn(2, length) * 1000  # (training's batch norm needs 2 items)
    model.frontend.channels_last = True  # training ignores the flag: the reference runs
    torch.manual_seed(1)
    trained = model.embed(x)
    model.frontend.channels_last = False
    torch.manual_seed(1)
    assert torch.equal(trained, model.embed(x))


# --- float64, checkpoints, run lock, eers.txt on resume, docs ------------------------------------

def test_center_update_in_float64_by_hand():
    """A float64 model's embeddings move float64 centers by Wen et al.'s rule, as in float32."""
    model = RawNetPretrain(SMALL).double().eval()
    center = CenterLoss(SMALL["nb_classes"], SMALL["nb_code"], alpha=0.5).double()
    center.centers.zero_()
    x = model.embed(torch.randn(3, model.min_samples, dtype=torch.float64))
    labels = torch.tensor([0, 0, 1])
    center.update(x, labels)
    # class 0: sum(0 - x) / (1 + 2), times -0.5; class 1: (0 - x) / 2, times -0.5; others stay 0
    expected = torch.zeros(SMALL["nb_classes"], SMALL["nb_code"], dtype=torch.float64)
    expected[0], expected[1] = (x[0] + x[1]) / 6, x[2] / 4
    torch.testing.assert_close(center.centers, expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("content,message", [
    (b"not a checkpoint", "checkpoint to resume from is truncated or corrupt"),
    ({"args": argparse.Namespace(bs=4)}, "checkpoint to resume from holds objects other than tensors"),
    ({"model": {}, "epoch": 0}, "not a checkpoint to resume from written by train_RawNet.py (it lacks "
                                "best_eer, center, optimizer, phase, rng, scheduler)"),
])
def test_a_corrupt_or_foreign_last_pt_is_one_line_naming_it(npy_corpus, tmp_path, content, message):
    """last.pt is loaded with weights_only=True: a file of other objects is refused, not unpickled."""
    last = tmp_path / "run" / "last.pt"
    last.parent.mkdir()
    if isinstance(content, bytes):
        last.write_bytes(content)
    else:
        torch.save(content, last)
    with pytest.raises(DataError, match=f"^{re.escape(f'{last}: {message}')}"):
        train_RawNet.main(train_RawNet.parse_args(run_flags(npy_corpus, tmp_path) + ["-resume"]))


def test_an_epoch_killed_before_last_pt_is_listed_once_after_resume(npy_corpus, tmp_path, monkeypatch):
    """Killed after gru epoch 1's eers.txt line but before its last.pt: the resumed run redoes that
    epoch, and eers.txt lists each epoch once."""
    save_atomic = runs.save_atomic

    def killed(obj, path):
        if str(path).endswith("last.pt") and (obj["phase"], obj["epoch"]) == (1, 1):
            raise KeyboardInterrupt
        save_atomic(obj, path)

    monkeypatch.setattr(runs, "save_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        train_RawNet.main(train_RawNet.parse_args(run_flags(npy_corpus, tmp_path)))
    monkeypatch.setattr(runs, "save_atomic", save_atomic)
    train_RawNet.main(train_RawNet.parse_args(run_flags(npy_corpus, tmp_path) + ["-resume"]))
    eers = (tmp_path / "run" / "eers.txt").read_text().splitlines()
    assert [line.split(", ")[:2] for line in eers] == [["phase:pretrain", "epoch:0"],
                                                       ["phase:gru", "epoch:0"], ["phase:gru", "epoch:1"]]


def test_a_second_run_on_the_same_folder_is_refused_naming_the_holder(npy_corpus, tmp_path):
    with runs.folder_lock(str(tmp_path / "run"), "test"):
        with pytest.raises(DataError, match=rf"run is in use by pid {os.getpid()} on .*: wait for it to end"):
            train_RawNet.main(train_RawNet.parse_args(run_flags(npy_corpus, tmp_path)))
    assert not (tmp_path / "run").exists()


def die_holding_the_lock(argv):
    with runs.folder_lock(argv[0], "test"):
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_stale_lock_of_a_killed_run_is_taken_over(npy_corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_forked(die_holding_the_lock, [str(run)])[0] == -signal.SIGKILL
    holder = json.loads((run / runs.LOCK_NAME).read_text())
    train_RawNet.main(train_RawNet.parse_args(run_flags(npy_corpus, tmp_path)))
    note = f"note: {run / runs.LOCK_NAME}: stale lock of pid {holder['pid']} on {holder['host']} (no longer"
    assert f"{note} running) taken over" in capsys.readouterr().out
    assert (run / "embeddings.pk").exists() and not (run / runs.LOCK_NAME).exists()


def test_a_run_whose_last_pt_is_lost_is_not_started_over(npy_corpus, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "eers.txt").write_text("phase:pretrain, epoch:0, val_eer:0.5000\n"
                                               "phase:gru, epoch:0, val_eer:0.4000\n")
    with pytest.raises(DataError, match=r"last\.pt not found, but .*eers\.txt lists 2 epochs: restore"):
        train_RawNet.main(train_RawNet.parse_args(run_flags(npy_corpus, tmp_path)))


def test_a_second_bvector_run_on_the_same_folder_is_refused(tmp_path):
    flags = ["-embeddings", str(tmp_path / "embeddings.pk"), "-out_dir", str(tmp_path / "bvec")]
    with runs.folder_lock(str(tmp_path / "bvec"), "test"):
        with pytest.raises(DataError, match=rf"bvec is in use by pid {os.getpid()} on .*another -out_dir"):
            train_bvec.main(train_bvec.parse_args(flags))


def test_rawnet1_readme_counts_the_classes_the_data_steps_prepare():
    """The baseline has a class per speaker of DB/VoxCeleb2/wav/ (DB/README.md's count); the README's
    recipe table states that count and the parameters of the networks built with it."""
    db = open(os.path.join(ROOT, "DB", "README.md")).read()
    prepared = re.search(r"wav/<spk>/<video>/<NNNNN>\.wav +training set: [^,]*, ([\d,]+) speakers", db)[1]
    readme = open(os.path.join(ROOT, "RawNet1", "README.md")).read()
    row = re.search(r"\| parameters \(1,211 classes / ([\d,]+)\)" + r" \| ([\d,]+)" * 3 + r" \|", readme)
    classes, *counts = (int(n.replace(",", "")) for n in row.groups())
    assert classes == int(prepared.replace(",", ""))
    baseline = RawNetBaseline(dict(PAPER, nb_code=1024, nb_classes=classes))
    models = [RawNetPretrain(PAPER), RawNet(PAPER), baseline]
    assert counts == [sum(p.numel() for p in m.parameters()) for m in models]
