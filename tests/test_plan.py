"""The measured plan of the fast path (fast_RawNet2.stages_for, -fast auto): choice from timings,
the cache file, and parity of every plan with the reference. No test depends on real timings:
the measurements are replaced by fixed numbers."""

import argparse
import copy
import functools
import importlib
import itertools
import json
import os
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import fast_RawNet2 as fr
import train_RawNet2 as train
import utils
from conftest import write_speakers
from test_fast import rel_err, small_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small networks gain nothing from threads, and on a busy machine spinning OpenMP threads make
    each small op wait for a descheduled peer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty plan cache of this test's own, and no plan remembered by this process."""
    monkeypatch.setenv(fr.CACHE_ENV, str(tmp_path))
    for name, empty in (("_plans", {}), ("_ran", {}), ("_pinned", {}), ("_bad_caches", set())):
        monkeypatch.setattr(fr, name, empty)
    return tmp_path / "plans.json"


def fake_timings(fast_wins):
    """measure_stages replaced: the stages in ``fast_wins`` time 1 s fast vs 2 s reference, the
    others the other way round. Records each call."""
    calls = []

    def measure(model, x, candidates, passes=fr.PLAN_PASSES):
        calls.append(tuple(candidates))
        return {s: {"reference": 2.0, **dict.fromkeys(names, 1.0)} if s in fast_wins
                else {"reference": 1.0, **dict.fromkeys(names, 2.0)} for s, names in candidates.items()}
    return measure, calls


def test_choose_keeps_fast_only_where_it_beats_the_reference_by_the_margin():
    timings = {"front_end": {"reference": 1.0, "fast": 0.5},
               "blocks": {"reference": 1.0, "fast": 1.0 - fr.MARGIN / 2},   # within the margin
               "gru": {"reference": 1.0, "fast": 1.5}}
    assert fr.choose(timings) == {"front_end": "fast", "blocks": "reference", "gru": "reference"}
    assert fr.choose({}) == fr.REFERENCE_PLAN  # nothing measured: the reference runs
    assert fr.choose(timings) == fr.choose(copy.deepcopy(timings))
    # several candidates: the fastest wins, a tie goes to the first name
    assert fr.choose({"front_end": {"reference": 1.0, "fast": 0.8, "fft": 0.5}})["front_end"] == "fft"
    assert fr.choose({"front_end": {"reference": 1.0, "fft": 0.5, "fast": 0.5}})["front_end"] == "fast"
    assert fr.choose({"front_end": {"reference": 1.0, "fast": 1.2, "fft": 0.99}})["front_end"] == "reference"


@pytest.mark.parametrize("fast_wins", [(), ("front_end",), ("blocks", "gru"), fr.STAGES])
def test_auto_plan_follows_the_timings_and_is_cached(cache, monkeypatch, capsys, fast_wins):
    measure, calls = fake_timings(fast_wins)
    monkeypatch.setattr(fr, "measure_stages", measure)
    model = small_model(False).eval()
    model.fast = "auto"
    x = torch.randn(2, model.nb_samp)
    with torch.no_grad():
        stages = fr.stages_for(model, x)
        fr.stages_for(model, x)
    assert stages.plan == {s: "fast" if s in fast_wins else "reference" for s in fr.STAGES}
    assert calls == [fr.STAGES]  # measured once: the second call reuses the plan
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("RawNet2 plan (eval-nograd, batch <= 2, float32)")
    entry, = json.loads(cache.read_text())["plans"].values()
    assert entry["plan"] == stages.plan and entry["timings"]["front_end"]["reference"] in (1.0, 2.0)

    monkeypatch.setattr(fr, "_plans", {})  # a new process: the plan comes from the file
    with torch.no_grad():
        assert fr.stages_for(model, x).plan == stages.plan
    assert len(calls) == 1 and "cached in" in capsys.readouterr().err


def plan_of(model, x):
    with torch.no_grad():
        return fr.stages_for(model, x).plan


def test_pinned_plans_run_before_the_cache_and_a_cached_plan_naming_no_implementation_is_not_run(
        cache, monkeypatch, capsys):
    measure, calls = fake_timings(("front_end",))
    monkeypatch.setattr(fr, "measure_stages", measure)
    model = small_model(False).eval()
    model.fast = "auto"
    x = torch.randn(2, model.nb_samp)
    plan = plan_of(model, x)
    entries = fr.plans_in_use()  # what a training keeps in last.pt
    (key, entry), = entries.items()
    assert entry["plan"] == plan == {**fr.REFERENCE_PLAN, "front_end": "fast"} and len(calls) == 1

    def cache_says(cached_plan):
        data = json.loads(cache.read_text())
        data["plans"][key]["plan"] = cached_plan
        cache.write_text(json.dumps(data))
        monkeypatch.setattr(fr, "_plans", {})  # a new process

    cache_says(fr.REFERENCE_PLAN)  # the cache changed since (measured again, say)
    fr.pin(entries, "as in last.pt")
    capsys.readouterr()
    assert plan_of(model, x) == plan and len(calls) == 1
    assert capsys.readouterr().err.strip().endswith("(as in last.pt)")
    assert fr.plans_in_use() == entries
    cache_says(fr.REFERENCE_PLAN)
    fr.pin({}, "as in last.pt")  # a new run: the pins of the one before are gone
    assert plan_of(model, x) == fr.REFERENCE_PLAN and len(calls) == 1
    cache_says({**plan, "blocks": "unknown"})  # a damaged entry is measured again, not run
    assert plan_of(model, x) == plan and len(calls) == 2
    not_plans = {"a": {"identity": entry["identity"], "plan": {**plan, "gru": 3}}, "b": "plan",
                 "c": {"identity": None, "plan": plan},
                 "d": {"identity": {}, "plan": {"segments_per_forward": 0}}}
    fr.pin(not_plans, "as in last.pt")
    assert fr._pinned == {}


def test_cached_plan_is_invalidated_by_torch_device_config_and_shape(cache, monkeypatch):
    measure, calls = fake_timings(("front_end",))
    monkeypatch.setattr(fr, "measure_stages", measure)
    model = small_model(False).eval()
    model.fast = "auto"
    x = torch.randn(2, model.nb_samp)

    def measured_again(change):
        monkeypatch.setattr(fr, "_plans", {})
        before = len(calls)
        change()
        plan_of(model, x)
        return len(calls) > before

    for variable in fr.KERNEL_ENV:  # (each is set below; the run's own settings are not a change)
        monkeypatch.delenv(variable, raising=False)
    assert measured_again(lambda: None)  # the first call measures
    assert not measured_again(lambda: None)  # then the file holds it
    assert measured_again(lambda: monkeypatch.setattr(torch, "__version__", "9.9.9"))
    identity = fr.device_identity
    assert measured_again(lambda: monkeypatch.setattr(
        fr, "device_identity", lambda device: {**identity(device), "device": "cuda", "gpu": "another"}))
    for variable, setting in zip(fr.KERNEL_ENV, ("default", "AVX2", "AVX2")):
        assert measured_again(functools.partial(monkeypatch.setenv, variable, setting)), variable
    wider = small_model(False).eval()  # another configuration: a GRU of another size
    wider.gru = torch.nn.GRU(24, 20, batch_first=True)
    wider.fc1_gru = torch.nn.Linear(20, 12)
    wider.fast = "auto"
    model = wider
    assert measured_again(lambda: None)
    x = torch.randn(5, model.nb_samp)  # batch 5: the next power of 2, 8, is another shape
    assert measured_again(lambda: None)
    x = torch.randn(7, model.nb_samp)  # 7 rounds up to 8 too
    assert not measured_again(lambda: None)
    model.train()  # training (forward and backward) is another context
    assert measured_again(lambda: None)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 0, "plans": {}}), json.dumps([1, 2])])
def test_corrupt_plan_file_is_ignored_with_one_line(cache, monkeypatch, capsys, content):
    cache.write_text(content)
    measure, calls = fake_timings(("gru",))
    monkeypatch.setattr(fr, "measure_stages", measure)
    model = small_model(False).eval()
    model.fast = "auto"
    assert plan_of(model, torch.randn(1, model.nb_samp))["gru"] == "fast"
    err = capsys.readouterr().err.splitlines()
    notes = [line for line in err if line.startswith("note: ignoring the plan cache")]
    assert len(notes) == 1 and str(cache) in notes[0]
    assert len(calls) == 1
    assert json.loads(cache.read_text())["format"] == fr.PLAN_FORMAT  # rewritten whole


def test_forced_modes_do_not_measure(cache, monkeypatch):
    monkeypatch.setattr(fr, "measure_stages", lambda *a, **k: pytest.fail("measured"))
    model = small_model(False).eval()
    x = torch.randn(1, model.nb_samp)
    for mode, plan in ((False, fr.REFERENCE_PLAN), (True, dict.fromkeys(fr.STAGES, "fast")),
                       ({"blocks": "fast"}, {**fr.REFERENCE_PLAN, "blocks": "fast"})):
        model.fast = mode
        assert plan_of(model, x) == plan
    model.fast = True
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 CPU code only: the blocks and GRU
        assert plan_of(model, x) == {**fr.REFERENCE_PLAN, "front_end": "fast"}
    assert not cache.exists()


def replica_of(module):
    """What nn.DataParallel's replicate() makes of ``module``: a copy of its attributes holding its
    parameters as plain, non-leaf tensors (here on the same CPU)."""
    replica = module._replicate_for_data_parallel()
    for name, p in module._parameters.items():
        if p is not None:
            setattr(replica, name, p.view_as(p))  # like a broadcast copy: autograd reaches p
    for name, child in module._modules.items():
        if child is not None:
            replica._modules[name] = replica_of(child)
    return replica


def test_data_parallel_replicas_run_the_plan_made_before_wrapping(cache, monkeypatch, capsys):
    measure, calls = fake_timings(("front_end", "blocks"))
    monkeypatch.setattr(fr, "measure_stages", measure)
    model = small_model(False).train()
    model.fast = "auto"
    x = torch.randn(2, model.nb_samp)
    with pytest.raises(RuntimeError, match="deepcopy"):  # why a replica must not measure
        copy.deepcopy(replica_of(model))
    # a replica of a network never planned: nothing measured, the reference
    assert fr.stages_for(replica_of(model), x).plan == fr.REFERENCE_PLAN and not calls
    assert "not planned for nn.DataParallel's replicas" in capsys.readouterr().err

    train.plan_replicas(model, argparse.Namespace(bs=4, amp="none"), torch.device("cpu"), 2)
    assert calls == [fr.STAGES] and model.training  # measured once, at the replicas' batch of 2
    replica = replica_of(model)
    plan = fr.stages_for(replica, x).plan
    assert plan == {"front_end": "fast", "blocks": "fast", "gru": "reference"} and len(calls) == 1
    same_plan = copy.deepcopy(model)  # the network itself, running that plan (tests/test_fast.py
    same_plan.fast = dict(plan)       # holds each plan to the reference)
    for net in (replica, same_plan):
        F.cross_entropy(net(x), torch.tensor([0, 1])).backward()
    for (name, p), q in zip(model.named_parameters(), same_plan.parameters()):
        assert p.grad is not None, name  # the replica's backward reached the network
        assert rel_err(p.grad, q.grad) < 1e-6, name


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


def test_fast_flag_values():
    assert [common.parse_fast(v) for v in ("auto", "AUTO", "True", "yes", "1", "False", "no", "0", True)] == \
        ["auto", "auto", True, True, True, False, False, False, True]
    with pytest.raises(Exception, match="auto, True or False"):
        common.parse_fast("sometimes")


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
    other = copy.deepcopy(ref)
    other.fast = plan
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
def test_the_folded_front_end_runs_without_gradients_only_and_gives_the_reference_embeddings(legacy):
    ref = small_model(legacy, nb_samp=8000).eval()
    other = copy.deepcopy(ref)
    x = torch.randn(3, ref.nb_samp)
    assert "fold" not in fr.applicable(ref, x)["front_end"]  # gradients on: a training-time choice
    with torch.no_grad():
        assert "fold" in fr.applicable(ref, x)["front_end"]
        for blocks, gru in itertools.product(("reference", "fast"), repeat=2):
            other.fast = {"front_end": "fold", "blocks": blocks, "gru": gru}
            assert rel_err(other.embed(x), ref.embed(x)) < 1e-5, (blocks, gru)


def test_measuring_leaves_the_model_untouched(cache):
    model = small_model(False, nb_samp=8000).train()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, model.nb_samp)
    candidates = fr.applicable(model, x)
    assert candidates == {"front_end": ["fast", "fft"], "blocks": ["fast"], "gru": ["fast"]}
    timings = fr.measure_stages(model, x, candidates, passes=1)
    assert {s: sorted(t) for s, t in timings.items()} == \
        {s: sorted(["reference", *v]) for s, v in candidates.items()}
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_segment_plan_picks_the_least_time_per_segment_and_caches_it(cache, capsys):
    model = small_model(False).eval()

    def measured(candidates, per_segment, warm_up=None):
        """The size kept, and the sizes of the forwards it was measured on (a cold cache)."""
        fr._plans.clear()
        cache.unlink(missing_ok=True)
        plan, sizes = fr.SegmentPlan(model, "cpu", False, candidates=candidates), []
        while not plan.done:
            sizes.append(plan.size)
            first = warm_up is not None and sizes.count(plan.size) == 1
            plan.observe(plan.size, (warm_up if first else per_segment[plan.size]) * plan.size)
        return plan.size, sizes

    size, sizes = measured((1, 2, 4), {1: 0.30, 2: 0.20, 4: 0.25}, warm_up=5.0)
    assert size == 2
    assert sizes == [1] * 3 + [2] * 3 + [4] * 3  # per size: one warm-up forward, then the timed ones
    assert "2 segments per forward" in capsys.readouterr().err
    # 5 is 1.5x slower than 3: 7 is not tried
    size, sizes = measured((1, 3, 5, 7), {1: 0.30, 3: 0.20, 5: 0.30, 7: 0.01})
    assert size == 3 and 7 not in sizes
    # 2 gains less than SEGMENT_STEP_GAIN over 1: 4 is not tried, and 1 stays (2 is not 1.2x faster)
    size, sizes = measured((1, 2, 4), {1: 0.30, 2: 0.28, 4: 0.01})
    assert size == 1 and 4 not in sizes
    # each size 1.15x faster than the one before: all are tried, and 4 (1.32x faster than 1) is kept
    assert measured((1, 2, 4), {1: 0.30, 2: 0.30 / 1.15, 4: 0.30 / 1.15 ** 2})[0] == 4
    # the fastest gains less than SEGMENT_MIN_GAIN over 1: 1 stays
    assert measured((1, 2, 4), {1: 0.30, 2: 0.27, 4: 0.26})[0] == 1
    # short forwards are timed over SEGMENT_MIN_SECONDS (0.25 s: 5 of 0.06 s), at most SEGMENT_MAX_PASSES
    sizes = measured((1, 2, 4), {1: 0.06, 2: 0.001, 4: 0.1})[1]
    assert (sizes.count(1), sizes.count(2), sizes.count(4)) == (1 + 5, 1 + fr.SEGMENT_MAX_PASSES, 1 + 2)

    measured((1, 2, 4), {1: 0.30, 2: 0.20, 4: 0.25})
    fr._plans.clear()
    again = fr.SegmentPlan(model, "cpu", False, candidates=(1, 2, 4))
    assert again.done and again.size == 2
    assert fr.SegmentPlan(model, "cpu", False, forced=7).size == 7
    other = copy.deepcopy(model)
    other.fast = True  # another path: planned on its own
    assert not fr.SegmentPlan(other, "cpu", False, candidates=(1, 2, 4)).done


def test_a_short_job_measures_nothing_and_runs_the_reference(cache, monkeypatch, capsys):
    monkeypatch.setattr(fr, "measure_stages", lambda *a, **k: pytest.fail("measured"))
    model = small_model(False).eval()
    model.fast = "auto"
    with fr.measuring(False):
        assert plan_of(model, torch.randn(1, model.nb_samp)) == fr.REFERENCE_PLAN
    assert "not measured for a short job" in capsys.readouterr().err and not cache.exists()
    short = fr.SegmentPlan(model, "cpu", False, candidates=(1, 4), measure=False)
    assert short.done and short.size == 1


@pytest.mark.parametrize("flags, cap, native", [
    (["avx2", "avx512f", "avx512_bf16"], "", True), (["avx2", "amx_bf16"], "AVX512_CORE_AMX", True),
    (["avx2", "avx512f"], "", False),                               # no bf16 instructions at all
    (["avx2", "avx512f", "avx512_bf16", "amx_bf16"], "AVX2", False),  # an AMX machine run as AVX2
    (["avx2", "avx512f", "avx512_bf16"], "avx512_core", False)])
def test_bf16_is_native_only_with_the_cpu_flag_and_uncapped_onednn(monkeypatch, capsys, flags, cap, native):
    monkeypatch.setattr(fr, "_cpuinfo", lambda: ("some CPU", flags))
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    monkeypatch.setattr(utils, "_amp_warned", set())
    assert fr.cpu_has_native_bf16() is native
    for _ in range(2):
        with utils.amp_autocast("cpu", "bf16"):
            pass
    warned = capsys.readouterr().err
    assert warned.count("warning: no native bfloat16 here") == (0 if native else 1)  # once per process


def test_survivors_drop_clear_losers_of_long_passes_only():
    long = {"reference": 1.0, "fast": 1.4, "fft": 1.6}
    assert fr.survivors(long) == {"reference", "fast"}
    short = {"reference": 0.01, "fast": 0.05, "fft": 0.1}  # one-time costs weigh more: keep all
    assert fr.survivors(short) == set(short)


@pytest.mark.parametrize("cached", [False, True])
def test_tta_extraction_measures_the_stage_plan_of_one_segment_then_of_the_size_kept(
        cached, cache, monkeypatch, tmp_path):
    contexts = []

    def measure(model, x, candidates, passes=fr.PLAN_PASSES):
        contexts.append(x.shape[0])
        return {s: {"reference": 1.0, **dict.fromkeys(names, 2.0)} for s, names in candidates.items()}
    monkeypatch.setattr(fr, "measure_stages", measure)
    monkeypatch.setattr(fr, "PLAN_MIN_UTTERANCES", 2)
    monkeypatch.setattr(fr, "CPU_SEGMENT_CANDIDATES", (1, 2))
    keys = write_speakers(str(tmp_path), ["id1", "id2"], 2, 3, np.random.default_rng(0))
    model = small_model(False, nb_samp=3200).eval()
    model.fast = "auto"
    if cached:  # a cached size of 2: the first (full) forward measures the plan of 2 segments
        sizes = fr.SegmentPlan(model, "cpu", False)
        fr.store(sizes.key, {"identity": sizes.identity, "plan": {"segments_per_forward": 2}})
    else:  # the sizes are tried (1 first), and 2 is kept whatever the times
        def observe(self, size, seconds):
            self.seen[size] += 1
            if self.seen[size] == 3:
                self.size, self.done = (2, size == 2)
        monkeypatch.setattr(fr.SegmentPlan, "observe", observe)
    out = dict(utils.iter_embeddings(model, keys, str(tmp_path), 3200, 800))
    assert set(out) == set(keys)
    assert contexts == ([2] if cached else [1, 2])


def test_tta_extraction_runs_full_forwards_across_utterances(tmp_path):
    """Forwards of exactly the planned size, an utterance's segments split over two where needed
    (the last forward takes the rest), and each embedding the mean of its own segments."""
    keys = write_speakers(str(tmp_path), ["id1", "id2", "id3"], 1, 3, np.random.default_rng(0))
    model = small_model(False, nb_samp=3200).eval()
    sizes, embed = [], model.embed

    def counting(x, stages=None):
        sizes.append(len(x))
        return embed(x, stages=stages)
    model.embed = counting
    out = dict(utils.iter_embeddings(model, keys, str(tmp_path), 3200, 800, segments_per_batch=3))
    total = sum(len(utils.tta_segments(utils.read_wav(os.path.join(tmp_path, k)), 3200, 800)) for k in keys)
    assert sizes == [3] * (total // 3) + ([total % 3] if total % 3 else [])
    assert total % 3 and len(set(sizes)) == 2  # the corpus does exercise a split utterance
    for key in keys:
        segments = utils.tta_segments(utils.read_wav(os.path.join(tmp_path, key)), 3200, 800)
        with torch.no_grad():
            expected = embed(torch.from_numpy(np.stack(segments))).mean(0).numpy()
        # (forwards of another size round differently; another utterance's segments would not be close)
        assert rel_err(torch.from_numpy(out[key]), torch.from_numpy(expected)) < 1e-4, key


def test_tta_extraction_starts_no_more_readers_than_cores(tmp_path):
    keys = write_speakers(str(tmp_path), ["id1", "id2"], 1, 2, np.random.default_rng(0))
    model = small_model(False, nb_samp=3200).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DataLoader warns of more workers than cores
        out = dict(utils.iter_embeddings(model, keys, str(tmp_path), 3200, 800,
                                         nb_worker=common.usable_cores() + 2))
    assert set(out) == set(keys)
