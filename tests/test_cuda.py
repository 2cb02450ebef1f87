"""On a GPU, what the CPU tests check: training steps of the fast path and the reference in fp32,
bf16 and fp16, the fast path's rule, -resume and -load_model_opt_dir, extraction, torchrun (NCCL).
Skipped without CUDA; bench/gpu_check.sh runs it with the GPU benchmarks."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import evaluate_pretrained_RawNet2 as evaluate
import fast_RawNet2
import scoring
import train_RawNet2 as train
import utils
from conftest import ROOT, tiny_run_flags
from test_fast import rel_err, small_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_float32(monkeypatch):
    """float32 parity needs float32 arithmetic: no TF32 in matmuls and convolutions."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def training_step(model, x, y, amp):
    # Scale 1: at the scaler's default 2^16 this small model's scaled gradients pass fp16's 65,504
    # and the step would be skipped with inf in the gradients compared below.
    scaler = torch.amp.GradScaler("cuda", init_scale=1.0) if amp == "fp16" else None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves the weights
    with utils.amp_autocast(CUDA, amp):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    utils.backward_step(loss, optimizer, scaler)  # (the scaler's step unscales the gradients in place)
    if scaler is not None:
        assert scaler.get_scale() == 1.0, "fp16 gradients overflowed: the step was skipped"
    return logits.float(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


# (logits, gradients) relative tolerance per precision: fp32 as on CPU; under autocast both paths
# round the same blocks and GRU, and differ only by the front end's float32 rounding carried on
TOLERANCE = {"none": (1e-4, 1e-4), "bf16": (2e-2, 5e-2), "fp16": (5e-3, 2e-2)}


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
@pytest.mark.parametrize("legacy", [False, True])
def test_training_step_fast_equals_reference_on_gpu(amp, legacy):
    ref = small_model(legacy).to(CUDA).train()
    # (the CPU kernels do not apply)
    fast = fast_RawNet2.accelerate(copy.deepcopy(ref), {"front_end": "fast"})
    torch.manual_seed(3)
    x = torch.randn(4, ref.nb_samp, device=CUDA)
    y = torch.randint(0, 7, (4,), device=CUDA)
    logits_ref, grads_ref = training_step(ref, x, y, amp)
    logits_fast, grads_fast = training_step(fast, x, y, amp)
    tol_logits, tol_grads = TOLERANCE[amp]
    assert rel_err(logits_fast, logits_ref) < tol_logits
    assert set(grads_fast) == set(grads_ref)
    for name, g in grads_fast.items():
        assert torch.isfinite(g).all(), name
        if not name.endswith("conv1.bias"):  # (see test_fast.py: 0 up to rounding)
            assert rel_err(g, grads_ref[name]) < tol_grads, name


def test_the_rule_runs_the_reference_on_gpu_and_equals_the_plain_network(capsys):
    ref = small_model(False).to(CUDA).eval()
    fast = fast_RawNet2.accelerate(copy.deepcopy(ref), True)
    x = torch.randn(3, ref.nb_samp, device=CUDA)
    with torch.no_grad():
        assert torch.equal(fast.embed(x), ref.embed(x))
    assert "front end reference (gpu), blocks reference, gru reference" in capsys.readouterr().err


def optimizer_state_devices(optimizer):
    return {t.device.type for state in optimizer.state.values() for t in state.values()
            if torch.is_tensor(t) and t.dim() > 0}  # (Adam's 0-dim step counter may stay on the CPU)


@pytest.fixture
def first_step_devices(monkeypatch):
    """Devices of the optimiser state when the trainer takes its first step of each run."""
    seen = []
    step = utils.backward_step

    def recording(loss, optimizer, scaler=None):
        if not seen:
            seen.append(optimizer_state_devices(optimizer) if optimizer.state else None)
        return step(loss, optimizer, scaler)

    monkeypatch.setattr(utils, "backward_step", recording)
    return seen


def test_resume_and_load_model_opt_dir_put_the_optimiser_on_the_gpu(tiny_corpus, tmp_path,
                                                                    first_step_devices):
    train.main(train.parse_args(tiny_run_flags(tiny_corpus, tmp_path, epochs=1)))
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["args"]["fast"] == "auto" and state["epoch"] == 0

    first_step_devices.clear()
    train.main(train.parse_args(tiny_run_flags(tiny_corpus, tmp_path, epochs=2) + ["-resume"]))
    assert first_step_devices[0] == {"cuda"}
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1

    models = tmp_path / "run" / "models"
    best = max(p for p in os.listdir(models) if p.startswith("TA_"))
    first_step_devices.clear()
    train.main(train.parse_args(tiny_run_flags(tiny_corpus, tmp_path, name="loaded", epochs=1) + [
        "-load_model", "True", "-load_model_dir", str(models / best),
        "-load_model_opt_dir", str(models / "best_opt_eval.pt")]))
    assert first_step_devices[0] == {"cuda"}


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_training_runs_on_gpu_with_each_precision(tiny_corpus, tmp_path, amp):
    eer = train.main(train.parse_args(tiny_run_flags(tiny_corpus, tmp_path, epochs=1) + ["-amp", amp]))
    assert 0 <= eer <= 1


def test_extraction_on_gpu_equals_the_one_segment_loop(tiny_corpus, tmp_path):
    torch.manual_seed(0)
    model = small_model(False, nb_samp=4000)
    folder = os.path.join(tiny_corpus, "VoxCeleb1", "eval_wav")
    keys = utils.list_utterances(folder)
    segments = torch.from_numpy(np.concatenate(
        [utils.tta_segments(utils.read_wav(os.path.join(folder, k)), 4000, 1000) for k in keys]))
    with torch.no_grad():  # batch-norm statistics of real activations (see test_evaluate.py)
        model.train()(segments)
    checkpoint = tmp_path / "model.pt"
    torch.save(model.state_dict(), checkpoint)
    flags = ["-extract", "-model_dir", str(checkpoint), "-DB", os.path.join(tiny_corpus, "VoxCeleb1"),
             "-window_size", "1000", "-nb_worker", "0", "-embd_dir", str(tmp_path / "embd"),
             "-eer_file", str(tmp_path / "eers.txt"), "-device", "cuda",
             "-trials", os.path.join(tiny_corpus, "VoxCeleb1", "veri_test.txt")]
    evaluate.main(evaluate.parse_args(flags))
    embeddings = scoring.load_embeddings(str(tmp_path / "embd" / "TTA_vox1_eval.pk"))
    reference = model.eval().to(CUDA)
    for key in keys:
        segs = utils.tta_segments(utils.read_wav(os.path.join(folder, key)), 4000, 1000)
        with torch.no_grad():
            loop = np.mean([reference.embed(torch.from_numpy(s[None].copy()).to(CUDA))[0].cpu().numpy()
                            for s in segs], axis=0)
        np.testing.assert_allclose(embeddings[common.utt_id(key)], loop, atol=1e-5, rtol=1e-4)


def torchrun_one(args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)


def test_torchrun_one_process_nccl():
    # bench/train_step.py joins a process group under torchrun even for one process: NCCL, DDP
    proc = torchrun_one([os.path.join(ROOT, "bench", "train_step.py"), "--variant", "fast",
                         "--steps", "1", "--warmup", "1", "--bs", "4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["world_size"] == 1 and result["peak_mem_kind"] == "CUDA allocator"
    assert "Grad strides do not match" not in proc.stderr


def test_torchrun_one_process_trains(tiny_corpus, tmp_path):
    proc = torchrun_one([os.path.join(ROOT, "tests", "torchrun_entry.py")]
                        + tiny_run_flags(tiny_corpus, tmp_path, epochs=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "device cuda" in proc.stdout


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.float32), ("fp16", torch.float16)])
@pytest.mark.parametrize("fast", [False, True])
def test_the_gru_runs_in_the_dtype_of_amp(amp, dtype, fast):
    # CUDA autocast alone runs every cuDNN RNN in float16: -amp bf16 ran the GRU in float16 without a
    # gradient scaler; it now runs in float32 (cuDNN has no bfloat16 RNN)
    model = fast_RawNet2.accelerate(small_model(False), fast).to(CUDA).train()
    outputs, gru_outputs = [], model.gru_outputs
    model.gru_outputs = lambda x: outputs.append(gru_outputs(x)) or outputs[-1]
    x = torch.randn(4, model.nb_samp, device=CUDA)
    with utils.amp_autocast(CUDA, amp):
        loss = model(x).float().square().mean()
    loss.backward()
    grad = model.gru.weight_hh_l0.grad
    assert outputs[0].dtype == dtype and grad.dtype == torch.float32 and torch.isfinite(grad).all()
