"""train_RawNet2.py end to end on a tiny corpus: outputs, resume, flags, bad input."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import fast_RawNet2
import train_RawNet2 as train
import utils
from common import DataError
from conftest import ROOT, tiny_run_flags
from model_RawNet2 import RawNet2, load_pretrained


def run(flags):
    return train.main(train.parse_args(flags))


def test_end_to_end_writes_every_output(tiny_corpus, tmp_path):
    run(tiny_run_flags(tiny_corpus, tmp_path, epochs=2))
    out = tmp_path / "run"
    eers = (out / "eers.txt").read_text().splitlines()
    assert [line.split(",")[0] for line in eers] == ["epoch:0", "epoch:1"]
    assert all(re.fullmatch(r"epoch:\d+, TA_eval_eer:\d\.\d{4}", line) for line in eers)
    n_trials = len(open(os.path.join(tiny_corpus, "VoxCeleb1", "veri_test.txt")).read().splitlines())
    for epoch in (0, 1):
        lines = (out / "results" / f"eval_epoch{epoch}.txt").read_text().splitlines()
        assert len(lines) == n_trials
        score, target = lines[0].split()
        assert np.isfinite(float(score)) and target in ("0", "1")
    params = (out / "f_params.txt").read_text()
    assert "bs:\t4\n" in params and "nb_classes:\t6\n" in params and "nb_params:" in params
    assert json.loads((out / "args.json").read_text())["d_args"]["nb_samp"] == 4000
    best = [f for f in os.listdir(out / "models") if f.startswith("TA_")]
    assert best and "best_opt_eval.pt" in os.listdir(out / "models")
    model = load_pretrained(out / "models" / sorted(best)[-1], d_args=None)
    assert model.nb_samp == 4000 and model.fc2_gru.out_features == 6
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and set(last) >= {"model", "optimizer", "scheduler", "best_eer", "rng", "step"}
    assert last["step"] == 2 * (24 // 4)  # 24 training utterances, batch 4, drop_last


def test_resume_continues_exactly(tiny_corpus, tmp_path):
    run(tiny_run_flags(tiny_corpus, tmp_path, name="full", epochs=2))
    run(tiny_run_flags(tiny_corpus, tmp_path, name="cut", epochs=1))
    run(tiny_run_flags(tiny_corpus, tmp_path, name="cut", epochs=2) + ["-resume"])
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert cut["epoch"] == 1 and cut["step"] == full["step"]
    for k, v in full["model"].items():
        torch.testing.assert_close(cut["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert (tmp_path / "full" / "eers.txt").read_text() == (tmp_path / "cut" / "eers.txt").read_text()


def test_existing_run_is_not_overwritten(tiny_corpus, tmp_path):
    run(tiny_run_flags(tiny_corpus, tmp_path, epochs=1))
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(DataError, match="already holds a run"):
        run(tiny_run_flags(tiny_corpus, tmp_path, epochs=1))
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_non_finite_loss_stops_with_step_and_keys(tiny_corpus, tmp_path, monkeypatch):
    run(tiny_run_flags(tiny_corpus, tmp_path, epochs=1))
    before = (tmp_path / "run" / "last.pt").read_bytes()

    class NanAfterTwo(torch.nn.CrossEntropyLoss):
        calls = 0

        def forward(self, logits, target):
            NanAfterTwo.calls += 1
            loss = super().forward(logits, target)
            return loss * float("nan") if NanAfterTwo.calls > 2 else loss

    monkeypatch.setattr(train.nn, "CrossEntropyLoss", NanAfterTwo)
    with pytest.raises(train.TrainingError,
                       match=r"non-finite loss nan at step 8 \(epoch 1\); batch utterances: id0"):
        run(tiny_run_flags(tiny_corpus, tmp_path, epochs=2) + ["-resume"])
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def copy_corpus(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_silent_files_are_skipped_never_nan(tiny_corpus, tmp_path):
    corpus = copy_corpus(tiny_corpus, tmp_path / "corpus")
    sf.write(os.path.join(corpus, "VoxCeleb2/wav/id00000/vid00000000/00001.wav"), np.zeros(3000), 16000)
    silent_eval = "id10000/vid00000000/00001.wav"
    sf.write(os.path.join(corpus, "VoxCeleb1/eval_wav", silent_eval), np.zeros(0), 16000)
    with pytest.warns(UserWarning, match="skipping .*00001.wav: empty or all-zero"):
        run(tiny_run_flags(corpus, tmp_path / "out", epochs=1))
    trials = open(os.path.join(corpus, "VoxCeleb1/veri_test.txt")).read().splitlines()
    scores = (tmp_path / "out" / "run" / "results" / "eval_epoch0.txt").read_text().splitlines()
    assert len(scores) == sum(silent_eval not in t for t in trials)
    assert all(np.isfinite(float(s.split()[0])) for s in scores)


def test_trial_key_without_audio_is_reported(tiny_corpus, tmp_path):
    corpus = copy_corpus(tiny_corpus, tmp_path / "corpus")
    with open(os.path.join(corpus, "VoxCeleb1/veri_test.txt"), "a") as f:
        f.write("1 id19999/x/00001.wav id19999/x/00002.wav\n")
    with pytest.raises(DataError, match=r"^2 trial keys .* id19999/x/00001, id19999/x/00002"):
        run(tiny_run_flags(corpus, tmp_path / "out", epochs=1))


def test_val_trial_selects_on_validation_list(tiny_corpus, tmp_path):
    corpus = copy_corpus(tiny_corpus, tmp_path / "corpus")
    # use the test speakers as a stand-in VoxCeleb1 dev set
    shutil.copytree(os.path.join(corpus, "VoxCeleb1/eval_wav"), os.path.join(corpus, "VoxCeleb1/dev_wav"))
    flags = tiny_run_flags(corpus, tmp_path / "out", epochs=1)
    run(flags + ["-make_val_trial", "-nb_val_trial", "20",
                 "-val_trial", os.path.join(corpus, "VoxCeleb1/val_trial.txt")])
    assert len(open(os.path.join(corpus, "VoxCeleb1/val_trial.txt")).readlines()) == 20
    line = (tmp_path / "out" / "run" / "eers.txt").read_text().strip()
    assert re.fullmatch(r"epoch:0, TA_eval_eer:\d\.\d{4}, TA_val_eer:\d\.\d{4}", line)


@pytest.mark.parametrize("flag,fast", [([], True), (["-fast"], True), (["-fast", "False"], False),
                                       (["-fast", "front_end=reference"], {"front_end": "reference"})])
def test_fast_flag_selects_the_path_and_the_run_records_its_plans(tiny_corpus, tmp_path, monkeypatch, flag,
                                                                   fast):
    # (outputs and gradients of the two paths are tied together in tests/test_fast.py; over several
    # training steps float32 rounding alone moves either path's parameters by percents)
    calls = []
    fused = fast_RawNet2.sinc_abs_maxpool_fft  # the rule's training front end for 8 filters
    monkeypatch.setattr(fast_RawNet2, "sinc_abs_maxpool_fft", lambda *a: calls.append(1) or fused(*a))
    run(tiny_run_flags(tiny_corpus, tmp_path, epochs=1) + flag)
    assert bool(calls) is (fast is True)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["args"]["fast"] == fast
    recorded = json.loads((tmp_path / "run" / "args.json").read_text())["fast_path"]
    if fast is False:
        assert recorded is None
    else:
        front_end = "fft (cpu-train-short-maps)" if fast is True else "reference (-fast)"
        assert recorded["training"].startswith("RawNet2 fast path (gradients, batch 4, float32, cpu ")
        assert recorded["training"].endswith(
            f"front end {front_end}, blocks fast (cpu-train), gru reference")
        assert recorded["segments_per_forward"] == 64  # 8 filters x 4,000 samples
        assert "(no gradients, batch 64, float32" in recorded["evaluation"]


def test_persistent_workers_give_the_crops_of_a_single_process_run(tiny_corpus, tmp_path):
    run(tiny_run_flags(tiny_corpus, tmp_path, name="w0", epochs=2))
    flags = tiny_run_flags(tiny_corpus, tmp_path, name="w2", epochs=2)
    flags[flags.index("-nb_worker") + 1] = "2"
    run(flags)
    a = torch.load(tmp_path / "w0" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "w2" / "last.pt", weights_only=True)["model"]
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_amp_bf16_trains_on_cpu(tiny_corpus, tmp_path, monkeypatch):
    logit_dtypes = []

    class RecordingLoss(torch.nn.CrossEntropyLoss):
        def forward(self, logits, target):
            logit_dtypes.append(logits.dtype)
            return super().forward(logits, target)

    monkeypatch.setattr(train.nn, "CrossEntropyLoss", RecordingLoss)
    best_eer = run(tiny_run_flags(tiny_corpus, tmp_path, epochs=1) + ["-amp", "bf16"])
    assert logit_dtypes == [torch.bfloat16] * (24 // 4)  # every training step ran under bf16 autocast
    assert f"TA_eval_eer:{best_eer:.4f}" in (tmp_path / "run" / "eers.txt").read_text()
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["step"] == 24 // 4 and last["scaler"] is None
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_amp_fp16_without_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: fp16 is allowed")
    with pytest.raises(DataError, match="-amp fp16 needs a GPU"):
        run(["-name", "x", "-amp", "fp16"])


# --- flags -------------------------------------------------------------------------------------

def test_defaults_are_the_papers():
    a = train.parse_args(["-name", "x"])
    assert (a.bs, a.lr, a.wd, a.epoch, a.optimizer, a.amsgrad) == (100, 0.001, 0.0001, 80, "Adam", True)
    assert (a.nb_samp, a.window_size, a.nb_worker, a.seed, a.nb_val_trial) == (59049, 11810, 8, 1234, 40000)
    assert (a.lr_decay, a.mg, a.reproducible, a.make_val_trial, a.load_model) == (
        "keras", True, True, False, False)
    assert (a.save_dir, a.DB, a.DB_vox2, a.dev_wav, a.val_wav, a.eval_wav) == (
        "DNNs/", "DB/VoxCeleb1/", "DB/VoxCeleb2/", "wav/", "dev_wav/", "eval_wav/")
    assert (a.m_first_conv, a.m_in_channels, a.m_nb_fc_node, a.m_gru_node, a.m_nb_gru_layer, a.m_nb_samp) == (
        251, 1, 1024, 1024, 1, 59049)
    assert a.m_filts == [128, [128, 128], [128, 256], [256, 256]]
    # The fast path's rule is the same math; mixed precision is opt-in.
    assert (a.fast, a.amp) == (True, "none")


@pytest.mark.parametrize("seed", ["-1", str(2 ** 32)])
def test_a_seed_numpy_cannot_take_is_one_line(tmp_path, seed):
    args = train.parse_args(["-name", "run", "-save_dir", str(tmp_path), "-seed", seed])
    with pytest.raises(DataError, match=rf"^-seed {seed}: must be from 0 to 2\*\*32 - 1"):
        train.validate_args(args)


def test_list_and_double_dash_flags_parse():
    a = train.parse_args(["--name", "x", "-m_filts", "[64,[64,64],[64,128],[128,128]]", "--DB", "/data/vox1/",
                          "-mg", "False", "-reproducible"])
    assert a.m_filts == [64, [64, 64], [64, 128], [128, 128]]
    assert (a.DB, a.mg, a.reproducible) == ("/data/vox1/", False, True)


def test_demo_sets_defaults_that_flags_override():
    a = train.parse_args(["-name", "d", "-demo", "-epoch", "1"])
    assert a.epoch == 1 and a.nb_samp == train.DEMO_DEFAULTS["nb_samp"] and a.DB.startswith("DB/demo")


def test_every_flag_has_help():
    parser = train.build_parser()
    assert all(action.help for action in parser._actions)


def test_cli_missing_db_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_RawNet2.py"), "-name", "x",
                           "-save_dir", str(tmp_path), "-DB_vox2", str(tmp_path / "novox2") + "/"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path}/novox2/wav/: folder not found "
        f"(it should hold <speaker>/<video>/<NNNNN>.wav files)"]


def test_cli_bad_sample_rate_in_worker_is_one_line(tiny_corpus, tmp_path):
    corpus = copy_corpus(tiny_corpus, tmp_path / "corpus")
    sf.write(os.path.join(corpus, "VoxCeleb2/wav/id00001/vid00000000/00001.wav"), np.ones(5000) * 0.1, 8000)
    flags = tiny_run_flags(corpus, tmp_path / "out")
    flags[flags.index("-nb_worker") + 1] = "1"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_RawNet2.py")] + flags,
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert re.search(r"^error: .*id00001/vid00000000/00001.wav: sample rate 8000 Hz, expected 16000 Hz "
                     r"\(DB/prepare_dataset.py converts audio to 16 kHz mono\)$",
                     proc.stderr.strip(), re.M)


# --- GPU set-up: the faults a CPU can show -----------------------------------------------------

def test_resume_on_fewer_gpus_restores_the_states_of_the_gpus_there_are(monkeypatch, capsys):
    first, second = torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)
    states = {**utils.rng_states(), "cuda": [first, second]}  # saved by a run on two GPUs
    restored = []

    def set_rng_state(state, device):  # one GPU here: device 1 does not exist
        if device >= 1:
            raise IndexError(f"device {device} out of range")
        restored.append((device, state))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                        lambda new: [set_rng_state(s, i) for i, s in enumerate(new)])
    utils.set_rng_states(states)
    assert restored == [(0, first)]
    assert capsys.readouterr().out == ("note: the checkpoint holds the CUDA random states of 2 GPUs and this "
                                       "machine shows 1: 1 restored, 1 left out\n")


def test_training_steps_read_no_loss_between_forward_and_backward(monkeypatch):
    events, losses = [], []

    class RecordingLoss(torch.nn.CrossEntropyLoss):
        def forward(self, logits, target):
            loss = super().forward(logits, target)
            losses.append(loss.detach().clone())
            events.append("forward")
            return loss

    def reading(name):
        original = getattr(torch.Tensor, name)
        return lambda self, *a, **k: events.append("read") or original(self, *a, **k)

    step = utils.backward_step
    monkeypatch.setattr(utils, "backward_step", lambda *a: events.append("backward") or step(*a))
    monkeypatch.setattr(train.nn, "CrossEntropyLoss", RecordingLoss)
    for name in ("item", "tolist", "__bool__", "__float__"):  # every way a value reaches the host
        monkeypatch.setattr(torch.Tensor, name, reading(name))
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,)), ["a/b/1.wav"] * 4) for _ in range(20)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mean, step_after = train.train_epoch(model, batches, optimizer, None, "cpu", 0, 0, progress=False)
    assert "forward,read" not in ",".join(events) and step_after == 20
    monkeypatch.undo()
    assert mean == sum(loss.item() for loss in losses) / 20


def test_cudnn_benchmark_is_on_only_when_asked(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # as an earlier run in this process left it
    seen, train_epoch = [], train.train_epoch
    monkeypatch.setattr(train, "train_epoch",
                        lambda *a, **k: seen.append(torch.backends.cudnn.benchmark) or train_epoch(*a, **k))
    run(tiny_run_flags(tiny_corpus, tmp_path, name="default", epochs=1))
    run(tiny_run_flags(tiny_corpus, tmp_path, name="asked", epochs=1) + ["-cudnn_benchmark", "True"])
    assert seen == [False, True]


@pytest.mark.slow
def test_compiled_training_writes_checkpoints_a_plain_rawnet2_loads(tiny_corpus, tmp_path, monkeypatch):
    compiled, compile_module = [], torch.nn.Module.compile

    def compile_quickly(module):  # (inductor takes minutes on a small CPU; keys do not depend on it)
        compiled.append(type(module))
        compile_module(module, backend="aot_eager")

    monkeypatch.setattr(torch.nn.Module, "compile", compile_quickly)
    run(tiny_run_flags(tiny_corpus, tmp_path, epochs=1) + ["-compile", "True"])
    assert compiled == [RawNet2]  # the network of model_RawNet2.py, not the fast path
    out = tmp_path / "run"
    plain = RawNet2(json.loads((out / "args.json").read_text())["d_args"])
    best = next(f for f in os.listdir(out / "models") if f.startswith("TA_"))
    plain.load_state_dict(torch.load(out / "models" / best, weights_only=True))  # strict keys
    plain.load_state_dict(torch.load(out / "last.pt", weights_only=True)["model"])


def test_compile_with_data_parallel_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = train.parse_args(["-name", "x", "-compile", "True"])
    with pytest.raises(DataError, match="^-compile does not work with DataParallel: use torchrun, or -mg"):
        train.wrap_model(torch.nn.Linear(2, 2), args, torch.device("cuda"))

