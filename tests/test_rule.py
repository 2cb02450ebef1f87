"""The fast path's fixed rule (fast_RawNet2.RULES, -fast): what it picks, that it depends on nothing
that changes between runs, that every choice computes the reference's numbers, and the one TTA
path (tta.tta_embeddings) that every embedding runs through."""

import copy
import importlib
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import fast_RawNet2 as fr
import train_RawNet2 as train
import tta
import utils
from conftest import ROOT, tiny_run_flags, write_speakers
from model_RawNet2 import RawNet2, default_d_args
from reliability_tools import assert_same_run
from test_fast import rel_err, small_model

PAPER = default_d_args(1000)
DEMO = {**default_d_args(1000, 16000), "filts": [32, [32, 32], [32, 64], [64, 64]], "gru_node": 128,
        "nb_fc_node": 128}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small networks gain nothing from threads, and on a busy machine spinning OpenMP threads make
    each small op wait for a descheduled peer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def picked(d_args, batch, grad, device="cpu", dtype="float32", cpu="avx512", overrides=None):
    call = fr.Call(device=device, cpu=cpu, filters=d_args["filts"][0], nb_samp=d_args["nb_samp"],
                   gru_node=d_args["gru_node"], batch=batch, grad=grad, dtype=dtype)
    return fr.plan(call, overrides)


def test_a_call_holds_the_facts_of_the_forward():
    model = RawNet2({**DEMO, "nb_classes": 3})
    x = torch.zeros(5, 16000)
    with torch.no_grad():
        assert fr.call_now(model, x) == fr.Call("cpu", fr.cpu_class(), 32, 16000, 128, 5, False, "float32")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fr.call_now(model, x).dtype == "bfloat16" and fr.call_now(model, x).grad


@pytest.mark.parametrize("cpu", ["avx512", "avx2", "other"])
def test_the_rule_rows_of_the_measured_shapes(cpu):
    train_paper = picked(PAPER, 4, True, cpu=cpu)
    assert train_paper.stages == {"front_end": "fast", "blocks": "fast", "gru": "fast"}
    assert train_paper.why == {"front_end": "cpu-train", "blocks": "cpu-train", "gru": "cpu-train-wide-gru"}
    assert picked(PAPER, 1, False, cpu=cpu).stages == {**fr.REFERENCE, "front_end": "fold"}
    assert picked(DEMO, 32, True, cpu=cpu).stages == {**fr.REFERENCE, "front_end": "fft", "blocks": "fast"}
    assert picked(DEMO, 16, False, cpu=cpu).stages == {**fr.REFERENCE, "front_end": "fft"}
    assert picked(DEMO, 1, False, cpu=cpu).stages == {**fr.REFERENCE, "front_end": "fold"}


def test_every_row_names_an_implementation_of_its_stage_and_its_benchmark():
    for rule in fr.RULES:
        assert rule.implementation in {"reference", *fr.IMPLEMENTATIONS[rule.stage]} and rule.benchmark


def test_gpu_runs_the_reference_everywhere():
    for d_args, batch, grad in itertools.product((PAPER, DEMO), (1, 100), (False, True)):
        p = picked(d_args, batch, grad, device="cuda")
        assert p.stages == fr.REFERENCE and p.why["front_end"] == "gpu"


def test_under_autocast_only_the_float32_front_end_takes_a_kernel():
    p = picked(PAPER, 4, True, dtype="bfloat16")
    assert p.stages == {**fr.REFERENCE, "front_end": "fast"}
    assert picked(DEMO, 32, True, dtype="bfloat16").stages == {**fr.REFERENCE, "front_end": "fft"}


def test_overrides_win_where_they_apply_and_say_so():
    p = picked(PAPER, 4, True, overrides={"front_end": "fft", "gru": "reference"})
    assert p.stages == {"front_end": "fft", "blocks": "fast", "gru": "reference"}
    assert p.why == {"front_end": "-fast", "blocks": "cpu-train", "gru": "-fast"}
    no_backward = picked(PAPER, 4, True, overrides={"front_end": "fold"})
    assert no_backward.stages["front_end"] == "reference"
    assert no_backward.why["front_end"] == "fold does not apply"
    assert picked(PAPER, 4, True, device="cuda", overrides={"blocks": "fast"}).stages == fr.REFERENCE


def test_the_rule_reads_no_clock_and_no_file(monkeypatch, tmp_path):
    """A forward of the fast network, plan included, with every clock and file opening refused."""
    model = fr.accelerate(small_model(False, nb_samp=8000), True)
    x = torch.randn(2, 8000)
    model(x)  # (imports and first-use set-up done)

    def refuse(*args, **kwargs):
        raise AssertionError("the run path read a clock or opened a file")
    for name in ("perf_counter", "monotonic", "time", "process_time"):
        monkeypatch.setattr(time, name, refuse)
    monkeypatch.setattr("builtins.open", refuse)
    monkeypatch.setenv("HOME", str(tmp_path))
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            model(x)
    assert os.listdir(tmp_path) == []


def test_no_clock_is_read_in_the_run_path():
    """No module a run imports reads a clock (bench/ times, tests time): nothing that runs, syncs or
    gives up can depend on how fast the machine is at the moment."""
    run_path = [name for name in os.listdir(ROOT) if name.endswith(".py")]
    run_path += [os.path.join(d, n) for d in ("RawNet1", "DB") for n in os.listdir(os.path.join(ROOT, d))
                 if n.endswith(".py")]
    for path in run_path:
        with open(os.path.join(ROOT, path)) as f:
            text = f.read()
        for word in ("perf_counter", "monotonic", "time.time(", "process_time", "idle_cores", "getloadavg",
                     "plans.json"):
            assert word not in text, (path, word)


def test_the_paper_network_does_not_import_the_fast_path():
    code = "import sys, model_RawNet2; print('fast_RawNet2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_accelerate_changes_the_stage_methods_only():
    model = small_model(False, nb_samp=8000)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    fast = fr.accelerate(model, {"blocks": "fast"})
    assert fast is model and isinstance(model, fr.FastRawNet2) and model.fast_overrides == {"blocks": "fast"}
    assert list(model.parameters()) == params and model.state_dict().keys() == state.keys()
    assert fr.accelerate(model, False) is model and type(model) is RawNet2
    assert "fast_overrides" not in model.__dict__
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_plan_line_names_every_stage_and_the_row_and_is_said_once(capsys, monkeypatch):
    monkeypatch.setattr(fr, "_announced", set())
    model = fr.accelerate(small_model(False, nb_samp=8000).eval(), True)
    with torch.no_grad():
        for _ in range(3):
            model.embed(torch.randn(2, 8000))
    err = capsys.readouterr().err
    assert err.count("RawNet2 fast path") == 1
    assert ("RawNet2 fast path (no gradients, batch 2, float32, cpu " in err
            and "front end fft (cpu-packed-short-maps), blocks reference, gru reference\n" in err)


def test_fast_flag_values():
    values = ("auto", "True", "yes", "1", "False", "no", "0", True, "front_end=fft, blocks=reference",
              "gru=fast")
    assert [common.parse_fast(v) for v in values] == [
        True, True, True, True, False, False, False, True, {"front_end": "fft", "blocks": "reference"},
        {"gru": "fast"}]
    for bad in ("sometimes", "front_end=fold2", "blocks=fft", "head=fast", "front_end"):
        with pytest.raises(Exception, match="stage=name pairs"):
            common.parse_fast(bad)


def test_the_flag_names_exactly_the_implementations_there_are():
    assert {s: set(names) for s, names in common.FAST_CHOICES.items()} == {
        s: {"reference", *fr.IMPLEMENTATIONS[s]} for s in fr.STAGES}


@pytest.mark.parametrize("d_args, device, expected", [
    (PAPER, "cpu", 16), (DEMO, "cpu", 64), ({**PAPER, "nb_samp": 600_000}, "cpu", 1),
    (PAPER, "cuda", 64), (DEMO, "cuda", 256)])
def test_segments_per_forward_is_a_rule_of_the_shapes_and_the_device(d_args, device, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: pytest.fail("free memory was read"))
    model = RawNet2({**d_args, "gru_node": 4, "nb_fc_node": 4})
    assert fr.segments_per_forward(model, device) == expected


ALL_PLANS = [dict(zip(fr.STAGES, impls))
             for impls in itertools.product(("reference", "fast", "fft"), *[("reference", "fast")] * 2)]


# every plan in the FMS layout; mixed plans in the legacy layout (test_fast.py has it all-fast)
PLAN_CASES = [(False, plan) for plan in ALL_PLANS] + [
    (True, {"front_end": "fast", "blocks": "reference", "gru": "fast"}),
    (True, {"front_end": "reference", "blocks": "fast", "gru": "reference"})]


@pytest.mark.parametrize("legacy,plan", PLAN_CASES,
                         ids=lambda p: "-".join(v[:3] for v in p.values()) if isinstance(p, dict) else str(p))
def test_every_plan_gives_the_reference_outputs_and_gradients(legacy, plan):
    ref = small_model(legacy, nb_samp=8000).train()  # the GRU sees 3 steps
    other = fr.accelerate(copy.deepcopy(ref), plan)
    torch.manual_seed(1)
    x = torch.randn(3, ref.nb_samp)
    y = torch.randint(0, 7, (3,))
    logits = {}
    for name, model in (("ref", ref), ("plan", other)):
        logits[name] = model(x)
        F.cross_entropy(logits[name], y).backward()
    assert rel_err(logits["plan"], logits["ref"]) < 1e-4
    grads = dict(ref.named_parameters())
    for name, p in other.named_parameters():
        if p.grad is None or name.endswith("conv1.bias"):  # (see test_fast.py: 0 up to rounding)
            continue
        assert rel_err(p.grad, grads[name].grad) < 1e-4, name
        assert p.grad.stride() == p.stride(), name  # the layout DDP's gradient buckets expect
    with torch.no_grad():
        assert rel_err(other.eval().embed(x), ref.eval().embed(x)) < 1e-5


@pytest.mark.parametrize("legacy", [False, True])
def test_the_folded_front_end_gives_the_reference_embeddings(legacy):
    ref = small_model(legacy, nb_samp=8000).eval()
    other = copy.deepcopy(ref)
    x = torch.randn(3, ref.nb_samp)
    with torch.no_grad():
        for blocks, gru in itertools.product(("reference", "fast"), repeat=2):
            fr.accelerate(other, {"front_end": "fold", "blocks": blocks, "gru": gru})
            assert rel_err(other.embed(x), ref.embed(x)) < 1e-5, (blocks, gru)


def test_data_parallel_replicas_run_under_the_callers_autocast_dtype(monkeypatch):
    """PyTorch's parallel_apply runs each replica in a new thread under autocast(enabled=...) with no
    dtype, and a new thread's autocast dtype is the default (float16 on CUDA, bfloat16 on CPU)."""
    seen = []

    def parallel_apply(modules, inputs, kwargs, devices):  # what PyTorch's does, in threads
        enabled = torch.is_autocast_enabled("cpu")

        def worker(module, inp):
            with torch.amp.autocast("cpu", enabled=enabled):
                module(*inp)
        for args in zip(modules, inputs):
            thread = threading.Thread(target=worker, args=args)
            thread.start()
            thread.join()

    monkeypatch.setattr(importlib.import_module("torch.nn.parallel.data_parallel"), "parallel_apply",
                        parallel_apply)
    wrapper = torch.nn.Module.__new__(train.DataParallel)
    torch.nn.Module.__init__(wrapper)
    wrapper.src_device_obj, wrapper.device_ids = torch.device("cpu"), [0, 1]
    replicas = [lambda _: seen.append(torch.get_autocast_dtype("cpu"))] * 2
    with torch.autocast("cpu", dtype=torch.float16):
        torch.nn.DataParallel.parallel_apply(wrapper, replicas, [(0,), (1,)], [{}, {}])
        assert seen == [torch.bfloat16] * 2  # PyTorch's class: the thread's default dtype
        seen.clear()
        wrapper.parallel_apply(replicas, [(0,), (1,)], [{}, {}])
        assert seen == [torch.float16] * 2
    seen.clear()
    wrapper.parallel_apply(replicas, [(0,), (1,)], [{}, {}])  # no autocast: the replicas as they are
    assert seen == [torch.bfloat16] * 2 and not torch.is_autocast_enabled("cpu")


def test_a_replica_made_by_data_parallel_runs_the_fast_path_on_its_own_parameters():
    """nn.DataParallel's replicate copies a module's __dict__ into a new object of its class: the
    replica is a FastRawNet2 whose stages read the replica's parameters."""
    model = fr.accelerate(small_model(False, nb_samp=8000).eval(), True)
    replica = model._replicate_for_data_parallel()
    assert type(replica) is fr.FastRawNet2 and replica.fast_overrides == model.fast_overrides
    x = torch.randn(2, 8000)
    with torch.no_grad():
        assert torch.equal(replica.embed(x), model.embed(x))


@pytest.mark.parametrize("flags, cap, native", [
    (["avx2", "avx512f", "avx512_bf16"], "", True), (["avx2", "amx_bf16"], "AVX512_CORE_AMX", True),
    (["avx2", "avx512f"], "", False),                               # no bf16 instructions at all
    (["avx2", "avx512f", "avx512_bf16", "amx_bf16"], "AVX2", False),  # an AMX machine run as AVX2
    (["avx2", "avx512f", "avx512_bf16"], "avx512_core", False)])
def test_bf16_is_native_only_with_the_cpu_flag_and_uncapped_onednn(monkeypatch, capsys, flags, cap, native):
    monkeypatch.setattr(fr, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    monkeypatch.setattr(utils, "_amp_warned", set())
    assert fr.cpu_has_native_bf16() is native
    for _ in range(2):
        with utils.amp_autocast("cpu", "bf16"):
            pass
    warned = capsys.readouterr().err
    assert warned.count("warning: no native bfloat16 here") == (0 if native else 1)  # once per process


# -- the one TTA path -----------------------------------------------------------------------------

def fake_forward(sizes):
    """A forward whose embedding of a segment is its first and last sample (so means are exact)."""
    def forward(batch):
        sizes.append(len(batch))
        return torch.stack([batch[:, 0], batch[:, -1]], 1)
    return forward


def test_tta_embeddings_packs_full_forwards_and_averages_each_utterance_in_order():
    rng = np.random.default_rng(0)
    counts = [3, 0, 5, 1, 0, 4]
    utterances = [(f"u{i}", torch.from_numpy(rng.standard_normal((n, 5), dtype=np.float32)))
                  for i, n in enumerate(counts)]
    sizes = []
    out = list(tta.tta_embeddings(fake_forward(sizes), iter(utterances), 4))
    assert [k for k, _ in out] == [k for k, _ in utterances]  # order kept, silent files included
    assert sizes == [4, 4, 4, 4]  # exactly 4 per forward, the last padded; utterances split across forwards
    for (_, segments), (_, code) in zip(utterances, out):
        if len(segments) == 0:
            assert code is None
        else:
            expected = torch.stack([segments[:, 0], segments[:, -1]], 1).mean(0).numpy()
            np.testing.assert_allclose(code, expected, rtol=1e-6)


def test_tta_embeddings_yields_each_utterance_as_soon_as_it_is_done():
    seen = []

    def utterances():
        for i in range(3):
            seen.append(i)
            yield f"u{i}", torch.zeros(2, 5)
    stream = tta.tta_embeddings(fake_forward([]), utterances(), 2)
    assert next(stream)[0] == "u0" and seen == [0]


def test_tta_extraction_runs_full_forwards_across_utterances(tmp_path):
    """Forwards of exactly the given size, an utterance's segments split over two where needed
    (the last forward padded), and each embedding the mean of its own segments."""
    keys = write_speakers(str(tmp_path), ["id1", "id2", "id3"], 1, 3, np.random.default_rng(0))
    model = small_model(False, nb_samp=3200).eval()
    sizes, embed = [], model.embed

    def counting(x):
        sizes.append(len(x))
        return embed(x)
    model.embed = counting
    out = dict(tta.iter_embeddings(model, keys, str(tmp_path), 3200, 800, segments_per_batch=3))
    total = sum(len(utils.tta_segments(utils.read_wav(os.path.join(tmp_path, k)), 3200, 800)) for k in keys)
    assert sizes == [3] * -(-total // 3)  # the last forward padded to the same size
    assert total % 3  # the corpus does exercise a split utterance and a padded forward
    for key in keys:
        segments = utils.tta_segments(utils.read_wav(os.path.join(tmp_path, key)), 3200, 800)
        with torch.no_grad():
            expected = embed(torch.from_numpy(np.stack(segments))).mean(0).numpy()
        # (forwards of another size round differently; another utterance's segments would not be close)
        assert rel_err(torch.from_numpy(out[key]), torch.from_numpy(expected)) < 1e-4, key


def test_tta_extraction_takes_the_rules_segments_per_forward(tmp_path):
    keys = write_speakers(str(tmp_path), ["id1"], 1, 3, np.random.default_rng(0))
    model = small_model(False, nb_samp=3200).eval()  # 16 filters x 3,200 samples: 64 segments fit
    sizes, embed = [], model.embed
    model.embed = lambda x: sizes.append(len(x)) or embed(x)
    dict(tta.iter_embeddings(model, keys, str(tmp_path), 3200, 800))
    total = sum(len(utils.tta_segments(utils.read_wav(os.path.join(tmp_path, k)), 3200, 800)) for k in keys)
    assert fr.segments_per_forward(model, "cpu") == 64 and total < 64 and sizes == [64]


def test_tta_extraction_starts_no_more_readers_than_cores(tmp_path):
    keys = write_speakers(str(tmp_path), ["id1", "id2"], 1, 2, np.random.default_rng(0))
    model = small_model(False, nb_samp=3200).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DataLoader warns of more workers than cores
        out = dict(tta.iter_embeddings(model, keys, str(tmp_path), 3200, 800,
                                         nb_worker=common.usable_cores() + 2))
    assert set(out) == set(keys)


# -- same command, same numbers -------------------------------------------------------------------

def train_in_a_new_process(flags, home):
    """train_RawNet2.py in a process of its own, with an empty home and cache folder; its stderr."""
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_RawNet2.py"), *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.listdir(home) == [], "the run wrote outside its own folder"
    return proc.stderr


def busy_processes(n):
    """n processes that keep a core each busy (for at most 10 minutes)."""
    code = "import time\nend = time.time() + 600\nwhile time.time() < end: pass"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


@pytest.mark.slow
def test_the_same_command_gives_the_same_numbers_on_a_busy_machine(tiny_corpus, tmp_path):
    """The same training twice, each in a new process with an empty cache folder, the second while two
    other processes keep the cores busy: the same plan lines, eers.txt and trial scores, and
    bit-identical weights."""
    runs = {}
    for name, load in (("quiet", 0), ("busy", 2)):
        home = tmp_path / f"home_{name}"
        home.mkdir()
        flags = tiny_run_flags(tiny_corpus, tmp_path / name, epochs=2)
        others = busy_processes(load)
        try:
            err = train_in_a_new_process(flags, home)
        finally:
            for p in others:
                p.kill()
                p.wait()
        runs[name] = (tmp_path / name / "run", [line for line in err.splitlines() if "fast path" in line])
    (quiet, quiet_lines), (busy, busy_lines) = runs["quiet"], runs["busy"]
    assert quiet_lines == busy_lines and len(quiet_lines) >= 2  # training and evaluation
    assert_same_run(str(busy), str(quiet))  # eers.txt, trial scores, weights, optimiser state
    quiet_args = json.loads((quiet / "args.json").read_text())["fast_path"]
    assert quiet_args == json.loads((busy / "args.json").read_text())["fast_path"]
