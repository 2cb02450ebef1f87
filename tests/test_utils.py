"""Data, segmentation, scoring and training helpers, each against an independent expectation."""

import os
import platform
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch

import common
import runs
import scoring
import tta
import utils
from common import DataError
from utils import SilentAudioError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- listing, labels, audio ------------------------------------------------------------------

def test_list_utterances_keys_and_labels(tmp_path):
    for key in ["id2/vB/00001.wav", "id1/vA/00002.wav", "id1/vA/00001.wav", "id2/vC/00001.wav"]:
        os.makedirs(tmp_path / os.path.dirname(key), exist_ok=True)
        sf.write(tmp_path / key, np.ones(10) * 0.1, 16000)
    (tmp_path / "id1/vA/notes.txt").write_text("not audio")
    keys = utils.list_utterances(str(tmp_path))
    assert keys == ["id1/vA/00001.wav", "id1/vA/00002.wav", "id2/vB/00001.wav", "id2/vC/00001.wav"]
    assert utils.speaker_labels(keys) == {"id1": 0, "id2": 1}


def test_list_utterances_missing_folder_names_it(tmp_path):
    with pytest.raises(DataError, match="nowhere.*folder not found"):
        utils.list_utterances(str(tmp_path / "nowhere"))


def test_read_wav_peak_normalises_like_the_original(tmp_path):
    x = np.array([0.1, -0.25, 0.2, 0.0])
    sf.write(tmp_path / "a.wav", x, 16000, subtype="FLOAT")
    y = utils.read_wav(str(tmp_path / "a.wav"))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, (x / 0.25).astype(np.float32))


@pytest.mark.parametrize("data,sr,match", [(np.zeros((100, 2)) + 0.1, 16000, "2 channels"),
                                           (np.ones(100) * 0.1, 8000, "8000 Hz")])
def test_read_wav_rejects_wrong_format_naming_the_file(tmp_path, data, sr, match):
    sf.write(tmp_path / "bad.wav", data, sr)
    with pytest.raises(DataError, match=f"bad.wav.*{match}"):
        utils.read_wav(str(tmp_path / "bad.wav"))


@pytest.mark.parametrize("n", [0, 50])
def test_read_wav_silent_or_empty_is_flagged(tmp_path, n):
    sf.write(tmp_path / "s.wav", np.zeros(n), 16000)
    with pytest.raises(SilentAudioError, match="s.wav"):
        utils.read_wav(str(tmp_path / "s.wav"))


# --- crops and TTA segments -------------------------------------------------------------------

def test_crop_tiles_short_waveform():
    np.testing.assert_array_equal(utils.crop_or_tile(np.array([1, 2, 3]), 7), [1, 2, 3, 1, 2, 3, 1])


def test_crop_exact_length_is_unchanged():
    x = np.arange(10)
    np.testing.assert_array_equal(utils.crop_or_tile(x, 10), x)


def test_crop_one_longer_always_starts_at_zero():
    # start is uniform in [0, len - nb_samp) = [0, 1): always 0, the last sample is never used
    rng = np.random.default_rng(0)
    for _ in range(20):
        np.testing.assert_array_equal(utils.crop_or_tile(np.arange(11), 10, rng), np.arange(10))


def test_crop_start_is_uniform_with_upper_bound_excluded():
    rng = np.random.default_rng(0)
    starts = [utils.crop_or_tile(np.arange(13), 10, rng)[0] for _ in range(600)]
    counts = np.bincount(starts, minlength=4)
    assert counts[3] == 0 and counts[:3].min() > 150


def starts_of(segments):
    return [int(s[0]) for s in segments]


def test_tta_shorter_is_one_tiled_segment():
    seg = utils.tta_segments(np.arange(4), 10, 3)
    np.testing.assert_array_equal(seg, [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1]])


def test_tta_exact_length_is_one_segment():
    np.testing.assert_array_equal(utils.tta_segments(np.arange(10), 10, 3), [np.arange(10)])


def test_tta_one_longer_is_first_and_right_aligned_last():
    seg = utils.tta_segments(np.arange(11), 10, 3)
    assert seg.shape == (2, 10) and starts_of(seg) == [0, 1]


def test_tta_many_windows():
    # nb_samp 10, overlap 3 -> step 7; len 47: n = (47 - 3) // 7 + 1 = 7 segments,
    # starts 0, 7, ..., 35 and the last one right-aligned at 47 - 10 = 37
    seg = utils.tta_segments(np.arange(47), 10, 3)
    assert starts_of(seg) == [0, 7, 14, 21, 28, 35, 37]
    np.testing.assert_array_equal(seg[-1], np.arange(37, 47))


def test_tta_paper_sizes():
    # 5 s at 16 kHz with the paper's sizes: (80000 - 11810) // 47239 + 1 = 2 segments
    seg = utils.tta_segments(np.arange(80000, dtype=np.float32), 59049, 11810)
    assert starts_of(seg) == [0, 80000 - 59049]


# --- trials, scores, EER ----------------------------------------------------------------------

def test_read_ahead_keeps_order_reads_at_most_two_per_thread_ahead_and_raises_as_it_was():
    started, readers, lock = [], set(), threading.Lock()

    def read(i):
        with lock:
            started.append(i)
            readers.add(threading.current_thread())
        time.sleep(0.002 * (4 - i % 4))  # later items finish first (the disorder under test)
        if i == 9:
            raise DataError("item 9 is bad")
        return i * i, threading.current_thread()

    items = tta.read_ahead(read, range(20), 2)
    taken = [next(items) for _ in range(3)]
    assert [value for value, _ in taken] == [0, 1, 4]
    assert all(thread is not threading.current_thread() for _, thread in taken)
    with lock:
        assert max(started) < 3 + 2 * 2  # the three taken, and at most two per thread ahead
    with pytest.raises(DataError, match="^item 9 is bad$"):
        for value, _ in items:
            assert value < 81
    with pytest.raises(StopIteration):
        next(items)

    started.clear()
    items = tta.read_ahead(read, range(100), 2)
    next(items)
    items.close()  # stops reading: its threads have ended, so nothing is started after the close
    assert not any(thread.is_alive() for thread in readers)
    assert len(started) < 10

    in_turn = tta.read_ahead(read, range(3), 0)
    assert [(v, t) for v, t in in_turn] == [(i * i, threading.current_thread()) for i in range(3)]


def test_read_trials_accepts_keys_with_or_without_wav(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("1 id1/a/00001.wav id1/b/00002.wav\n\n0 id1/a/00001 id2/c/00001\n")
    labels, a, b = scoring.read_trials(str(path))
    assert labels.tolist() == [1, 0]
    assert a == ["id1/a/00001", "id1/a/00001"] and b == ["id1/b/00002", "id2/c/00001"]


def test_read_trials_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("1 a b\n2 a b\n")
    with pytest.raises(DataError, match=r"t.txt:2:"):
        scoring.read_trials(str(path))


def test_check_keys_reports_count_and_examples():
    with pytest.raises(DataError, match=r"^2 trial keys .*a/x/1, b/y/2"):
        scoring.check_keys(["a/x/1", "b/y/2", "c/z/3"], {"c/z/3"}, "trial keys")


def test_cosine_scores_equal_per_trial_loop():
    rng = np.random.default_rng(0)
    emb = {f"u{i}": rng.standard_normal(16).astype(np.float32) for i in range(30)}
    a = [f"u{i}" for i in rng.integers(0, 30, 200)]
    b = [f"u{i}" for i in rng.integers(0, 30, 200)]
    loop = [np.dot(emb[x], emb[y]) / (np.linalg.norm(emb[x]) * np.linalg.norm(emb[y])) for x, y in zip(a, b)]
    np.testing.assert_allclose(scoring.cosine_scores(emb, a, b, chunk=7), loop, rtol=1e-5)


def test_cosine_scores_reject_zero_or_nan_embedding():
    emb = {"a": np.zeros(4), "b": np.ones(4), "c": np.array([np.nan, 1, 1, 1])}
    with pytest.raises(DataError, match="2 embeddings.*a, c"):
        scoring.cosine_scores(emb, ["a", "c"], ["b", "b"])


def test_eer_hand_made_cases():
    assert scoring.compute_eer([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1])[0] == pytest.approx(0.0)
    assert scoring.compute_eer([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9])[0] == pytest.approx(1.0)
    # targets 0.9, 0.3; non-targets 0.6, 0.1: any threshold misses one of two on one side
    assert scoring.compute_eer([1, 1, 0, 0], [0.9, 0.3, 0.6, 0.1])[0] == pytest.approx(0.5)
    # 4 targets, 4 non-targets, one of each on the wrong side: EER 1/4
    eer, thr = scoring.compute_eer([1, 1, 1, 1, 0, 0, 0, 0], [0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.1, 0.05])
    assert eer == pytest.approx(0.25)


def slow_eer(labels, scores):
    """Independent reference: sweep every threshold, interpolate where FAR and FRR cross."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    thresholds = np.sort(np.unique(scores))
    far = np.array([np.mean(scores[labels == 0] >= t) for t in thresholds])
    frr = np.array([np.mean(scores[labels == 1] < t) for t in thresholds])
    i = np.flatnonzero(frr >= far)[0]
    if i == 0:
        return (far[0] + frr[0]) / 2
    d0, d1 = far[i - 1] - frr[i - 1], far[i] - frr[i]
    w = d0 / (d0 - d1)
    return far[i - 1] + w * (far[i] - far[i - 1])


def test_eer_matches_slow_reference_on_random_scores():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 3000)
    scores = rng.standard_normal(3000) + 1.2 * labels
    assert scoring.compute_eer(labels, scores)[0] == pytest.approx(slow_eer(labels, scores), abs=2e-3)


def test_eer_undefined_with_one_class():
    with pytest.raises(DataError, match="only targets or only non-targets"):
        scoring.compute_eer([1, 1], [0.2, 0.3])


def test_validation_trials_are_half_targets_and_well_formed():
    keys = [f"id{s}/v/{u:05d}.wav" for s in range(5) for u in range(3)]
    lines = utils.make_validation_trials(keys, 40, np.random.default_rng(0))
    assert len(lines) == 40
    for line in lines:
        label, a, b = line.split()
        assert a in keys and b in keys and a != b
        assert (label == "1") == (a.split("/")[0] == b.split("/")[0])
    assert sum(line.startswith("1") for line in lines) == 20


# --- training helpers ---------------------------------------------------------------------------

def test_init_weights_touches_only_conv_and_linear():
    from model_RawNet2 import RawNet2
    torch.manual_seed(0)
    model = RawNet2({"first_conv": 251, "in_channels": 1, "filts": [8, [8, 8], [8, 16], [16, 16]],
                     "nb_fc_node": 16, "gru_node": 16, "nb_gru_layer": 1, "nb_samp": 4000, "nb_classes": 3})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.apply(utils.init_weights)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert all(".conv" in k or "fc" in k for k in changed)
    assert not any("bn" in k or k.startswith(("ln.", "first_conv.", "gru.")) for k in changed)
    assert torch.all(model.fc1_gru.bias == 1e-4) and torch.all(model.block0[0].frm.fc.bias == 1e-4)
    # Kaiming-normal with a = 0.01 on conv weights: std = gain / sqrt(fan_in)
    w = model.block2[0].conv2.weight
    gain = (2 / (1 + 0.01 ** 2)) ** 0.5
    assert w.std().item() == pytest.approx(gain / (16 * 3) ** 0.5, rel=0.1)


def test_keras_decay_through_the_scheduler():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=0.001)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=utils.keras_lr_decay)
    for _step in range(1, 2501):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001 / (1 + 1e-4 * 2500))


def test_fused_adam_is_amsgrad_adam_by_hand_and_keeps_adams_state_layout():
    """utils.adam (the fused kernel) against Adam with AMSGrad and coupled weight decay written out
    in float64, with the keras decay stepped after each update; its state loads into a default Adam."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    grads = [[torch.randn_like(p) * (k + 1) for p in params] for k in range(6)]
    start = [p.detach().double().clone() for p in params]
    groups = [{"params": [params[0]], "weight_decay": 1e-2}, {"params": [params[1]], "weight_decay": 0.0}]
    opt = utils.adam(groups, lr=0.01, amsgrad=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=utils.keras_lr_decay)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        sched.step()
    b1, b2, eps = 0.9, 0.999, 1e-8
    for i, (w, wd) in enumerate(zip(start, (1e-2, 0.0))):
        m = v = v_max = torch.zeros_like(w)
        for t, step_grads in enumerate(grads, 1):
            g = step_grads[i].double() + wd * w
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            v_max = torch.maximum(v_max, v)
            lr = 0.01 / (1 + 1e-4 * (t - 1))
            w = w - lr / (1 - b1 ** t) * m / (v_max.sqrt() / (1 - b2 ** t) ** 0.5 + eps)
        torch.testing.assert_close(params[i].detach().double(), w, rtol=1e-5, atol=1e-7)
    state = opt.state_dict()
    assert set(state["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    plain = torch.optim.Adam(groups, lr=0.01, amsgrad=True)
    plain.load_state_dict(state)
    plain.step()  # the default kernel continues from the fused one's state


def test_weight_decay_is_zero_for_bn_parameters():
    from model_RawNet2 import RawNet2, default_d_args
    model = RawNet2(default_d_args(10))
    decayed, free = utils.param_groups(model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 1e-4 and free["weight_decay"] == 0.0
    assert {names[id(p)] for p in free["params"]} == {n for n in names.values() if "bn" in n}
    assert "first_bn.weight" in {names[id(p)] for p in free["params"]}
    assert len(decayed["params"]) + len(free["params"]) == len(names)


def test_atomic_save_leaves_no_partial_file(tmp_path):
    path = tmp_path / "ck.pt"
    runs.save_atomic({"a": torch.ones(2)}, str(path))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        runs.save_atomic({"a": Unpicklable()}, str(path))
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_atomic_path_publishes_what_a_program_wrote_only_once_it_succeeded(tmp_path):
    path = tmp_path / "out.wav"
    write = [sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write('done')"]
    with common.atomic_path(str(path)) as tmp:
        subprocess.run(write + [tmp], check=True)
        assert not path.exists()
    assert path.read_text() == "done"
    with pytest.raises(subprocess.CalledProcessError):
        with common.atomic_path(str(path)) as tmp:
            subprocess.run(write + [tmp], check=True)
            subprocess.run([sys.executable, "-c", "raise SystemExit(1)"], check=True)
    assert path.read_text() == "done" and os.listdir(tmp_path) == ["out.wav"]


def test_fault_hook_reaches_a_file_written_by_a_program(tmp_path, monkeypatch):
    monkeypatch.setenv(common.FAULT_ENV, "enospc@out.wav")
    with pytest.raises(common.OutputError, match=r"out.wav: not written \(No space left on device\)"):
        with common.atomic_path(str(tmp_path / "out.wav")) as tmp:
            subprocess.run([sys.executable, "-c", f"open({tmp!r}, 'w').write('x' * 100)"], check=True)
    assert os.listdir(tmp_path) == []


def test_append_line_keeps_the_lines_before_and_names_a_refused_file(tmp_path):
    path = tmp_path / "eers.txt"
    common.append_line(str(path), "a")
    common.append_line(str(path), "b")
    assert path.read_text() == "a\nb\n"
    with pytest.raises(common.OutputError, match=rf"^{tmp_path}: not written \(Is a directory\)"):
        common.append_line(str(tmp_path), "c")


def test_partial_read_crop_equals_full_read_crop(tmp_path):
    rng = np.random.default_rng(3)
    lengths = {"a/v/00001.wav": 50_000, "a/v/00002.wav": 9_000,
               "b/v/00001.wav": 10_000, "b/v/00002.wav": 10_001}
    for key, n in lengths.items():
        os.makedirs(tmp_path / os.path.dirname(key), exist_ok=True)
        sf.write(tmp_path / key, rng.uniform(-0.7, 0.7, n), 16000, subtype="PCM_16")
    keys = sorted(lengths)
    index = utils.wav_index(keys, str(tmp_path), nb_worker=2, progress=False)
    assert {k: v[0] for k, v in index.items()} == lengths
    assert os.path.exists(str(tmp_path) + "_index.npz")
    for key in keys:
        for seed in range(5):
            full = utils.crop_or_tile(utils.read_wav(str(tmp_path / key)), 10_000,
                                      np.random.default_rng(seed))
            part = utils.read_crop(str(tmp_path / key), *index[key], 10_000, np.random.default_rng(seed))
            assert part.dtype == np.float32
            np.testing.assert_array_equal(part, full)
    # the cache is reused for unchanged files, and a changed file is indexed again
    sf.write(tmp_path / "b/v/00002.wav", rng.uniform(-0.1, 0.1, 12_345), 16000, subtype="PCM_16")
    again = utils.wav_index(keys, str(tmp_path), progress=False)
    assert again["b/v/00002.wav"][0] == 12_345
    assert ({k: v for k, v in again.items() if k != "b/v/00002.wav"}
            == {k: v for k, v in index.items() if k != "b/v/00002.wav"})


def test_train_set_with_index_yields_the_same_crops(tmp_path):
    rng = np.random.default_rng(4)
    for key in ["a/v/00001.wav", "b/v/00001.wav"]:
        os.makedirs(tmp_path / os.path.dirname(key), exist_ok=True)
        sf.write(tmp_path / key, rng.uniform(-0.5, 0.5, 30_000), 16000, subtype="PCM_16")
    keys = ["a/v/00001.wav", "b/v/00001.wav"]
    labels = utils.speaker_labels(keys)
    plain = utils.TrainSet(keys, str(tmp_path), labels, 8000, seed=7)
    fast = utils.TrainSet(keys, str(tmp_path), labels, 8000, seed=7,
                          index=utils.wav_index(keys, str(tmp_path), progress=False))
    for epoch in (0, 3):
        plain.epoch = fast.epoch = epoch
        for i in range(2):
            np.testing.assert_array_equal(plain[i][0], fast[i][0])


FAULTS_OF_A_REUSED_BLOCK = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
import common
applied = common.keep_freed_memory()
faults = []
for _ in range(12):  # a 64 MiB tensor, written, freed: as a front-end map is at every step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults[-3:]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting applies to glibc's malloc only")
def test_keep_freed_memory_lets_a_freed_block_be_reused_without_page_faults():
    def run(env):
        out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REUSED_BLOCK, ROOT], check=True,
                             capture_output=True, text=True, env={**os.environ, **env}).stdout.split()
        return out[0] == "True", int(out[1])
    # glibc's defaults (kept with RAWNET2_MALLOC=default): a fresh mmap each time, one fault per page
    # touched (16,384; 32 where the kernel maps huge pages)
    applied, faults_default = run({"RAWNET2_MALLOC": "default"})
    assert not applied and faults_default >= 16
    # kept: once the heap has room for it (a few rounds: each aligned request is a little larger
    # than the block freed before), the pages of the block freed before, without faults
    applied, faults = run({"RAWNET2_MALLOC": ""})
    assert applied and faults <= faults_default // 4
