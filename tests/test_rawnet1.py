"""RawNet1/: pre-processing, both phases, losses, phase-2 initialisation, b-vector back-end, end to end.
Each test checks one behaviour against an independent expectation (hand computation, closed form)."""

import math
import os
import pickle
import re
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn as nn

from conftest import ROOT

sys.path.append(os.path.join(ROOT, "RawNet1"))

import pre_process_waveforms  # noqa: E402
import train_bvec  # noqa: E402
import train_RawNet  # noqa: E402
from data_RawNet import load_index, pre_emphasis, read_int16  # noqa: E402
from model_RawNet import (CenterLoss, DropoutGRU, RawNet, RawNetBaseline, RawNetPretrain,  # noqa: E402
                          between_speaker_loss, init_from_pretrained)
from utils import DataError  # noqa: E402

PAPER = {"filts": [128, 128, 256], "nb_blocks": [2, 4], "gru_node": 1024, "nb_code": 128,
         "dropout": 0.5, "gru_dropout": 0.3, "nb_classes": 1211}
SMALL = dict(PAPER, filts=[8, 8, 16], gru_node=12, nb_code=8, nb_classes=5)
TINY_FLAGS = ["-nb_samp", "729", "-m_filts", "[4,4,8]", "-m_blocks", "[1,1]", "-m_gru_node", "8",
              "-m_nb_code", "8", "-bs", "4", "-nb_val_spk", "2", "-nb_val_trial", "20", "-epoch_pre", "1",
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
    head = block(256, 256) + conv(256, 256, 1) + bn(256) + (256 * 128 + 128) + bn(128) + (128 * 1211 + 1211)
    assert sum(p.numel() for p in RawNetPretrain(PAPER).parameters()) == frontend() + head == 2_363_579
    code, logits = RawNetPretrain(SMALL)(torch.randn(2, 3 ** 9))
    assert code.shape == (2, 8) and logits.shape == (2, 5)


def test_phase2_parameter_count_and_shapes():
    gru = 3 * 1024 * (256 + 1024) + 2 * 3 * 1024
    head = gru + (1024 * 128 + 128) + bn(128) + (128 * 1211 + 1211)
    assert sum(p.numel() for p in RawNet(PAPER).parameters()) == frontend() + head == 5_939_131
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
    args = pre_process_waveforms.parse_args(["-wav_dir", str(wavs), "-out_dir", str(tmp_path / "npy"), "-nb_worker", "2"])
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


@pytest.mark.parametrize("data,sr,match", [(np.ones((10, 2)), 16000, "2 channels"), (np.ones(10), 8000, "8000 Hz")])
def test_pre_processing_rejects_wrong_format_in_one_line(tmp_path, data, sr, match):
    write_wav(tmp_path / "wav/id1/v1/00001.wav", 1000 * data, sr)
    args = pre_process_waveforms.parse_args(["-wav_dir", str(tmp_path / "wav"), "-out_dir", str(tmp_path / "npy")])
    with pytest.raises(DataError, match=f"00001.wav: .*{match}") as e:
        pre_process_waveforms.main(args, progress=False)
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "npy/index.json")


# --- losses -----------------------------------------------------------------------------------

def test_between_speaker_loss_by_hand():
    # Unit vectors (1,0), (0,1), (1,1)/sqrt2: off-diagonal cosines 0, 1/sqrt2, 1/sqrt2, each twice.
    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    expected = 2 * (0 + 2 / math.sqrt(2)) / (3 * 2)
    assert between_speaker_loss(weight).item() == pytest.approx(expected, rel=1e-6)


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


def test_gru_unroll_equals_nn_gru_without_dropout():
    torch.manual_seed(0)
    gru = DropoutGRU(6, 5, recurrent_dropout=0.3)
    x = torch.randn(3, 7, 6)
    reference = nn.GRU(6, 5, batch_first=True)
    reference.load_state_dict(gru.state_dict())
    torch.testing.assert_close(gru.unroll(x, torch.ones(3, 5)), reference(x)[0])


# --- phase-2 initialisation ---------------------------------------------------------------------

def test_phase2_init_copies_exactly_the_matching_phase1_tensors():
    torch.manual_seed(1)
    phase1 = RawNetPretrain(SMALL).state_dict()
    torch.manual_seed(2)
    phase2 = RawNet(SMALL)
    before = {k: v.clone() for k, v in phase2.state_dict().items()}
    copied, kept = init_from_pretrained(phase2, phase1)
    after = phase2.state_dict()
    # Shared by name and shape: the front-end, the embedding's BN and the softmax layer.
    assert set(copied) == {k for k in after if k.split(".")[0] in ("frontend", "bn_code", "fc_out")}
    assert {k.split(".")[0] for k in kept} == {"gru", "fc_code"}  # fc_code: 1024 -> 128 vs 256 -> 128
    for k in copied:
        assert torch.equal(after[k], phase1[k]), k
    for k in kept:
        assert torch.equal(after[k], before[k]), k


# --- b-vector ---------------------------------------------------------------------------------

def test_bvector_pairs_are_balanced():
    speaker_rows = [np.arange(0, 3), np.arange(3, 4), np.arange(4, 9), np.arange(9, 11)]
    speaker = np.repeat(np.arange(4), [3, 1, 5, 2])
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b, labels = train_bvec.balanced_pairs(speaker_rows, 120, rng)
        assert len(labels) == 120 and labels.sum() == 60
        same = speaker[a] == speaker[b]
        np.testing.assert_array_equal(same, labels == 1)
        assert np.all(a[labels == 1] != b[labels == 1])  # two different utterances


def test_bvector_input_is_sum_difference_product():
    model = train_bvec.BVectorDNN(2, hidden=3, nb_layer=1).eval()
    seen = []
    model.hidden[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    model(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 5.0]]))
    torch.testing.assert_close(seen[0], torch.tensor([[4.0, 7.0, -2.0, -3.0, 3.0, 10.0]]))


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


def test_end_to_end_writes_pickle_and_both_eers(npy_corpus, tmp_path, capsys):
    train_RawNet.main(train_RawNet.parse_args(run_flags(npy_corpus, tmp_path)))
    out = tmp_path / "run"
    eers = (out / "eers.txt").read_text().splitlines()
    assert [line.split(", ")[:2] for line in eers] == [["phase:pretrain", "epoch:0"], ["phase:gru", "epoch:0"],
                                                       ["phase:gru", "epoch:1"]]
    assert all(re.fullmatch(r"phase:\w+, epoch:\d, val_eer:\d\.\d{4}, eval_eer:\d\.\d{4}", line) for line in eers)
    with open(out / "embeddings.pk", "rb") as f:
        embeddings = pickle.load(f)
    assert set(embeddings) == {"dev_dic_embeddings", "eval_dic_embeddings"}
    assert len(embeddings["dev_dic_embeddings"]) == 24 and len(embeddings["eval_dic_embeddings"]) == 12
    vector = embeddings["eval_dic_embeddings"]["id10000/vid00000000/00001"]  # id without .wav
    assert vector.shape == (8,) and vector.dtype == np.float32

    eers = train_bvec.main(train_bvec.parse_args(
        ["-embeddings", str(out / "embeddings.pk"), "-trials", npy_corpus["trials"], "-epoch", "2",
         "-nb_batch_per_epoch", "3", "-bs", "8", "-m_hidden", "16", "-nb_val_spk", "2", "-nb_val_trial", "20",
         "-progress", "false"]))
    assert set(eers) == {"cosine", "bvec"} and all(0 <= v <= 1 for v in eers.values())
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
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    resumed = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    assert (resumed["phase"], resumed["epoch"]) == (full["phase"], full["epoch"]) == (1, 1)
    for k, v in full["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, msg=k)
    torch.testing.assert_close(resumed["center"]["centers"], full["center"]["centers"])
    assert (tmp_path / "full" / "eers.txt").read_text() == (tmp_path / "cut" / "eers.txt").read_text()


def test_vox2_baseline_recipe_defaults_and_run(npy_corpus, tmp_path):
    args = train_RawNet.parse_args(["-name", "x", "-recipe", "vox2_baseline"])
    assert (args.bs, args.epoch, args.lr, args.lr_decay, args.wd, args.amsgrad) == (120, 40, 0.001, 5e-5, 1e-4, True)
    assert (args.bs_lambda, args.c_lambda, args.m_gru_node, args.m_nb_code, args.nb_samp) == (0, 0, 1024, 1024, 59049)
    train_RawNet.main(train_RawNet.parse_args(run_flags(npy_corpus, tmp_path) + ["-recipe", "vox2_baseline"]))
    assert [line.split(", ")[0] for line in (tmp_path / "run" / "eers.txt").read_text().splitlines()] == ["phase:baseline"] * 2
    assert set(torch.load(tmp_path / "run" / "models" / "baseline_best.pt", weights_only=False)["model"]) >= {
        "first_conv.weight", "block1.0.bn1.weight", "block1.0.conv_downsample.weight", "fc2_gru.weight"}


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
