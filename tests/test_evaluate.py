"""evaluate_pretrained_RawNet2.py and the scoring/embedding helpers it uses, each against an
independent expectation (hand-computed cases, slow per-trial references)."""

import codecs
import copy
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import common
import evaluate_pretrained_RawNet2 as ev
import fast_RawNet2
import scoring
import tta
import utils
from common import DataError
from conftest import ROOT
from model_RawNet2 import RawNet2

TINY = {"first_conv": 251, "in_channels": 1, "filts": [8, [8, 8], [8, 16], [16, 16]],
        "nb_fc_node": 16, "gru_node": 16, "nb_gru_layer": 1, "nb_samp": 4000, "nb_classes": 6}


def run(flags):
    return ev.main(ev.parse_args(flags))


def cos_sim(a, b):
    """The original script's per-trial score."""
    return np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))


# --- metrics ------------------------------------------------------------------------------------

def test_min_dcf_hand_computed():
    # targets 0.9, 0.4; non-targets 0.6, 0.1. Operating points (P_miss, P_fa): accept none (1, 0),
    # t=0.9 (.5, 0), t=0.6 (.5, .5), t=0.4 (0, .5), t=0.1 (0, 1).
    labels, scores = [1, 0, 1, 0], [0.9, 0.6, 0.4, 0.1]
    # p = 0.01: C_def = 0.01; best is t=0.9 with 0.5 * 0.01 -> 0.5
    assert scoring.compute_min_dcf(labels, scores, 0.01) == pytest.approx((0.5, 0.9))
    # p = 0.5: C_def = 0.5; t=0.9 costs 0.25 -> 0.5 (t=0.4 ties)
    assert scoring.compute_min_dcf(labels, scores, 0.5)[0] == pytest.approx(0.5)
    # perfectly separated scores cost nothing
    assert scoring.compute_min_dcf([1, 1, 0], [0.8, 0.7, 0.1], 0.05)[0] == 0.0


def slow_min_dcf(labels, scores, p, c_miss=1.0, c_fa=1.0):
    """Every threshold (each score, plus accept-none), costs counted from scratch."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    tar, non = scores[labels == 1], scores[labels == 0]
    costs = [c_miss * np.mean(tar < t) * p + c_fa * np.mean(non >= t) * (1 - p)
             for t in np.append(np.unique(scores), np.inf)]
    return min(costs) / min(c_miss * p, c_fa * (1 - p))


@pytest.mark.parametrize("p", [0.01, 0.05, 0.3])
def test_min_dcf_matches_slow_reference(p):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 1500)
    scores = np.round(rng.standard_normal(1500) + 1.5 * labels, 2)  # rounding makes ties
    expected = pytest.approx(slow_min_dcf(labels, scores, p), abs=1e-12)
    assert scoring.compute_min_dcf(labels, scores, p)[0] == expected
    assert scoring.compute_min_dcf(labels, scores, [p, 0.5])[0][0] == expected


def test_min_dcf_undefined_with_one_class():
    with pytest.raises(DataError, match="only targets or only non-targets"):
        scoring.compute_min_dcf([0, 0], [0.1, 0.2], 0.01)


def test_asnorm_matches_slow_reference():
    rng = np.random.default_rng(4)
    emb = {f"u{i}": rng.standard_normal(8).astype(np.float32) for i in range(10)}
    cohort = rng.standard_normal((20, 8))
    keys_a, keys_b = ["u0", "u1", "u2", "u3"], ["u4", "u5", "u6", "u0"]
    table = scoring.EmbeddingTable.from_dict(emb)
    rows_a, rows_b = table.rows(keys_a), table.rows(keys_b)
    raw = table.cosine(rows_a, rows_b)
    got = scoring.asnorm_scores(raw, table, rows_a, rows_b, cohort, top_n=5)

    def stats(key):
        top = sorted((cos_sim(emb[key].astype(float), c) for c in cohort), reverse=True)[:5]
        return np.mean(top), np.std(top)

    for score, a, b, g in zip(raw, keys_a, keys_b, got):
        (ma, sa), (mb, sb) = stats(a), stats(b)
        assert g == pytest.approx(0.5 * ((score - ma) / sa + (score - mb) / sb), rel=1e-9)


# --- scoring pickles ----------------------------------------------------------------------------

def speaker_embeddings(rng, speakers, per_speaker, dim=32, noise=1.5, prefix="id1"):
    out = {}
    for s in range(speakers):
        mean = rng.standard_normal(dim)
        for u in range(per_speaker):
            embedding = mean + noise * rng.standard_normal(dim)
            out[f"{prefix}{s:04d}/vid/{u + 1:05d}"] = embedding.astype(np.float32)
    return out


def write_list(path, rng, keys, n):
    spk = np.array([k.split("/")[0] for k in keys])
    a, b = rng.integers(0, len(keys), n), rng.integers(0, len(keys), n)
    same = rng.integers(0, len(keys), n // 2)  # force some targets: pair each with a same-speaker key
    b[:n // 2] = [rng.choice(np.flatnonzero(spk == spk[i])) for i in same]
    a[:n // 2] = same
    with open(path, "w") as f:
        f.writelines(f"{int(spk[i] == spk[j])} {keys[i]}.wav {keys[j]}.wav\n" for i, j in zip(a, b))


@pytest.fixture
def scored_dir(tmp_path):
    """Small dev/eval pickles and the three lists (O over eval keys, E/H over dev + eval keys)."""
    rng = np.random.default_rng(0)
    dev = speaker_embeddings(rng, 12, 6, prefix="id0")
    evl = speaker_embeddings(rng, 5, 6, prefix="id1")
    common.write_pickle_atomic(dev, str(tmp_path / "TTA_vox1_dev.pk"))
    common.write_pickle_atomic(evl, str(tmp_path / "TTA_vox1_eval.pk"))
    write_list(tmp_path / "vox_original.txt", rng, sorted(evl), 300)
    write_list(tmp_path / "list_test_all_cleaned.txt", rng, sorted(dev) + sorted(evl), 2000)
    write_list(tmp_path / "list_test_hard_cleaned.txt", rng, sorted(dev) + sorted(evl), 1500)
    return tmp_path, {**dev, **evl}


def score_flags(folder):
    return ["-embd_dir", str(folder), "-trial_dir", str(folder), "-eer_file", str(folder / "eers.txt")]


def loop_eer(path, embeddings, dtype=np.float64):
    """The original method: one cos_sim per trial in a Python loop, then roc_curve + brentq."""
    labels, scores = [], []
    for line in open(path):
        target, a, b = line.split()
        labels.append(int(target))
        scores.append(cos_sim(embeddings[a[:-4]].astype(dtype), embeddings[b[:-4]].astype(dtype)))
    return scoring.compute_eer(labels, scores)[0]


def test_three_lines_verbatim_and_eers_appended(scored_dir, capsys):
    folder, embeddings = scored_dir
    (folder / "eers.txt").write_text("earlier run\n")
    run(score_flags(folder))
    run(score_flags(folder))
    out = capsys.readouterr().out.splitlines()
    names = ["Vox original", "Vox1_E_cleaned", "Vox1_H_cleaned"]
    files = ["vox_original.txt", "list_test_all_cleaned.txt", "list_test_hard_cleaned.txt"]
    expected = [f"{n} evaluation EER: {loop_eer(folder / f, embeddings)}" for n, f in zip(names, files)]
    assert out[0::2][:3] == expected
    for line in out[1:6:2]:  # the metrics line under each EER line
        assert line.startswith("  minDCF(p_target=0.01) ") and ", minDCF(p_target=0.05) " in line
        assert ", EER threshold " in line
    assert (folder / "eers.txt").read_text() == "earlier run\n" + "".join(e + "\n" for e in expected * 2)


def test_vectorised_eer_equals_per_trial_loop(tmp_path):
    rng = np.random.default_rng(5)
    dev = speaker_embeddings(rng, 60, 20, dim=256, noise=3.0, prefix="id0")
    evl = speaker_embeddings(rng, 10, 20, dim=256, noise=3.0, prefix="id1")
    common.write_pickle_atomic(dev, str(tmp_path / "TTA_vox1_dev.pk"))
    common.write_pickle_atomic(evl, str(tmp_path / "TTA_vox1_eval.pk"))
    write_list(tmp_path / "vox_original.txt", rng, sorted(evl), 5000)
    write_list(tmp_path / "list_test_all_cleaned.txt", rng, sorted(dev) + sorted(evl), 30000)
    results = run(score_flags(tmp_path))
    assert results["Vox original"]["eer"] == pytest.approx(loop_eer(tmp_path / "vox_original.txt", evl),
                                                           abs=1e-9)
    both = {**dev, **evl}
    assert results["Vox1_E_cleaned"]["eer"] == pytest.approx(
        loop_eer(tmp_path / "list_test_all_cleaned.txt", both), abs=1e-9)
    assert 0.01 < results["Vox1_E_cleaned"]["eer"] < 0.4  # a non-trivial operating point


def test_absent_list_is_skipped_with_a_note(scored_dir, capsys):
    folder, _ = scored_dir
    os.remove(folder / "list_test_hard_cleaned.txt")
    results = run(score_flags(folder))
    assert set(results) == {"Vox original", "Vox1_E_cleaned"}
    assert (f"note: {folder / 'list_test_hard_cleaned.txt'} not found: Vox1_H_cleaned skipped"
            in capsys.readouterr().out)


def test_score_dir_writes_score_target_keys(scored_dir):
    folder, embeddings = scored_dir
    run(score_flags(folder) + ["-trials", str(folder / "vox_original.txt"),
                               "-score_dir", str(folder / "scores")])
    trials = open(folder / "vox_original.txt").read().splitlines()
    lines = (folder / "scores" / "vox_original.txt").read_text().splitlines()
    assert len(lines) == len(trials)
    score, target, a, b = lines[7].split()
    assert (target, a + ".wav", b + ".wav") == tuple(trials[7].split())
    assert float(score) == pytest.approx(cos_sim(embeddings[a], embeddings[b]), rel=1e-6)


def test_missing_keys_error_or_skip(scored_dir, capsys):
    folder, _ = scored_dir
    with open(folder / "vox_original.txt", "a") as f:
        f.write("1 id9/x/00001.wav id10000/vid/00001.wav\n0 id9/x/00001.wav id9/y/00002.wav\n")
    flags = score_flags(folder) + ["-trials", str(folder / "vox_original.txt")]
    with pytest.raises(DataError, match=r"^2 trial keys .* e\.g\. id9/x/00001, id9/y/00002"):
        run(flags)
    results = run(flags + ["-skip_missing"])
    assert "2 of 302 trials skipped, 2 keys have no embedding" in capsys.readouterr().out
    assert "vox_original" in results


def test_nan_or_zero_embedding_is_named(tmp_path):
    emb = {"id1/v/00001": np.ones(4, np.float32), "id1/v/00002": np.array([1, np.nan, 0, 0], np.float32),
           "id2/v/00001": np.zeros(4, np.float32)}
    common.write_pickle_atomic(emb, str(tmp_path / "TTA_vox1_eval.pk"))
    (tmp_path / "t.txt").write_text("1 id1/v/00001 id1/v/00002\n0 id1/v/00001 id2/v/00001\n")
    with pytest.raises(DataError, match="TTA_vox1_eval.pk: 1 embeddings hold NaN or infinite values, "
                                        "e.g. id1/v/00002"):
        run(score_flags(tmp_path) + ["-trials", str(tmp_path / "t.txt")])
    del emb["id1/v/00002"]
    common.write_pickle_atomic(emb, str(tmp_path / "TTA_vox1_eval.pk"))
    (tmp_path / "t.txt").write_text("0 id1/v/00001 id2/v/00001\n1 id1/v/00001 id1/v/00001\n")
    with pytest.raises(DataError, match="1 embeddings are non-finite or zero, e.g. id2/v/00001"):
        run(score_flags(tmp_path) + ["-trials", str(tmp_path / "t.txt")])


def test_unparsable_line_and_single_class_list(scored_dir):
    folder, _ = scored_dir
    (folder / "bad.txt").write_text("1 id10000/vid/00001 id10000/vid/00002\n\n1 id10000/vid/00001\n")
    with pytest.raises(DataError, match=r"bad.txt:3: expected"):
        run(score_flags(folder) + ["-trials", str(folder / "bad.txt")])
    (folder / "one.txt").write_text("1 id10000/vid/00001 id10000/vid/00002\n"
                                    "1 id10001/vid/00001 id10001/vid/00003\n")
    with pytest.raises(DataError, match="EER is undefined: the trials hold only targets"):
        run(score_flags(folder) + ["-trials", str(folder / "one.txt")])


def test_npy_format_round_trip(tmp_path):
    emb = {"b/v/00001": np.arange(3, dtype=np.float32), "a/v/00002": np.ones(3, np.float32)}
    scoring.save_embeddings(emb, str(tmp_path / "e.npy"))
    assert (tmp_path / "e_keys.txt").read_text() == "a/v/00002\nb/v/00001\n"
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), [[1, 1, 1], [0, 1, 2]])
    back = scoring.load_embeddings(str(tmp_path / "e.npy"))
    assert set(back) == set(emb) and all(np.array_equal(back[k], emb[k]) for k in emb)


def test_npz_archive_given_as_npy_is_one_line(tmp_path):
    np.savez(tmp_path / "e", np.ones((2, 3), np.float32))
    os.replace(tmp_path / "e.npz", tmp_path / "e.npy")
    (tmp_path / "e_keys.txt").write_text("a/1\nb/1\n")
    with pytest.raises(DataError, match=r"e.npy: a .npz archive"):
        scoring.load_embeddings(str(tmp_path / "e.npy"))


def test_empty_npy_file_is_one_line(tmp_path):
    (tmp_path / "e.npy").write_bytes(b"")
    (tmp_path / "e_keys.txt").write_text("a/1\n")
    with pytest.raises(DataError, match=r"e.npy: not a plain .npy matrix"):
        scoring.load_embeddings(str(tmp_path / "e.npy"))


def test_npy_key_list_with_byte_order_mark_or_not_utf8(tmp_path):
    np.save(tmp_path / "e.npy", np.ones((2, 3), np.float32))
    (tmp_path / "e_keys.txt").write_text("a/1\nb/1\n", encoding="utf-8-sig")
    assert sorted(scoring.load_embeddings(str(tmp_path / "e.npy"))) == ["a/1", "b/1"]
    (tmp_path / "e_keys.txt").write_bytes(b"a/1\n\xe9/1\n")
    with pytest.raises(DataError, match=r"e_keys.txt: not UTF-8 text"):
        scoring.load_embeddings(str(tmp_path / "e.npy"))


def test_asnorm_reported_beside_raw(scored_dir, capsys):
    folder, embeddings = scored_dir
    results = run(score_flags(folder) + ["-asnorm", "-cohort", str(folder / "TTA_vox1_dev.pk"),
                                         "-asnorm_top_n", "5", "-trials", str(folder / "vox_original.txt")])
    out = capsys.readouterr().out
    assert "vox_original evaluation EER (AS-norm, top 5): " in out
    assert 0 <= results["vox_original"]["asnorm"]["eer"] < 0.5


def test_asnorm_cohort_of_another_dimension_is_one_line(scored_dir):
    folder, _ = scored_dir
    common.write_pickle_atomic({"c/1": np.ones(3, np.float32), "d/1": np.arange(3, dtype=np.float32)},
                               str(folder / "cohort.pk"))
    with pytest.raises(DataError, match=r"cohort.pk: 3-dimensional embeddings \(-cohort\)"):
        run(score_flags(folder) + ["-asnorm", "-cohort", str(folder / "cohort.pk")])


# --- restricted unpickling ----------------------------------------------------------------------

class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "TTA_vox1_eval.pk", "wb") as f:
        pickle.dump({"id1/v/00001": Evil(marker)}, f)
    with pytest.raises(DataError, match=r"TTA_vox1_eval.pk: not loaded, refused to load (posix|os)\.system"):
        scoring.load_embeddings(str(tmp_path / "TTA_vox1_eval.pk"))
    assert not marker.exists()


def test_real_pickle_is_accepted_including_numpy1_layout(tmp_path):
    emb = {"id1/v/00001": np.arange(4, dtype=np.float32), "id1/v/00002.wav": np.ones(4, np.float32)}
    data = pickle.dumps(emb, protocol=3)
    # the released pickles were written by numpy 1.x, whose arrays name numpy.core.multiarray
    old = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert old != data
    for i, blob in enumerate([data, old]):
        (tmp_path / f"{i}.pk").write_bytes(blob)
        back = scoring.load_embeddings(str(tmp_path / f"{i}.pk"))
        assert sorted(back) == ["id1/v/00001", "id1/v/00002"]
        np.testing.assert_array_equal(back["id1/v/00001"], np.arange(4))


@pytest.mark.parametrize("protocol", range(6))
def test_embedding_pickles_give_what_pickle_load_gives(tmp_path, protocol):
    """The loader leaves arrays as raw bytes and joins them into one matrix (float32 vectors, as
    numpy pickles them) or rebuilds them as numpy would (any other layout): either way the vectors
    are those of a plain pickle.load, whichever protocol wrote them (0-2 store bytes as latin-1
    text)."""
    rng = np.random.default_rng(protocol)
    shared = rng.standard_normal(5).astype(np.float32)
    cases = {
        "float32": {f"s/v/{i:05d}.wav": rng.standard_normal(5).astype(np.float32) for i in range(7)},
        "one array under two keys": {"s/v/00001": shared, "s/v/00002": shared},
        "float64 and ints": {"s/v/00001": rng.standard_normal(5), "s/v/00002": np.arange(5)},
        "big-endian": {"s/v/00001": np.arange(5, dtype=">f4"), "s/v/00002": np.ones(5, ">f4")},
        "two sizes": {"s/v/00001": np.zeros(5, np.float32), "s/v/00002": np.zeros(4, np.float32)},
    }
    for name, emb in cases.items():
        path = str(tmp_path / f"{protocol}.pk")
        with open(path, "wb") as f:
            pickle.dump(emb, f, protocol=protocol)
        if name == "two sizes":
            with pytest.raises(DataError, match="expected 1-D real vectors of one size"):
                scoring.load_embeddings(path)
            continue
        with open(path, "rb") as f:
            expected = {k.removesuffix(".wav"): v.astype(np.float32) for k, v in pickle.load(f).items()}
        joined = scoring._vector_bytes(scoring.load_pickle(path, scoring._ArrayUnpickler)) is not None
        # protocol 5 pickles arrays as buffers numpy wraps without a copy: nothing to join there
        assert joined == (protocol < 5 and name in ("float32", "one array under two keys")), name
        back = scoring.load_embeddings(path)
        assert list(back) == list(expected), name
        for key, vector in expected.items():
            assert back[key].dtype == np.float32 and np.array_equal(back[key], vector), (name, key)
        table = scoring.EmbeddingTable.read([path])
        np.testing.assert_array_equal(table.matrix, np.stack(list(expected.values())))


class CraftedArray:
    def __init__(self, args, state):
        self.args, self.state = args, state

    def __reduce__(self):  # numpy's rebuild, with what numpy refuses
        return np._core.multiarray._reconstruct, self.args, self.state


@pytest.mark.parametrize("blob", [
    pickle.dumps({"s/v/00001": CraftedArray((np.ndarray, "x", b"b"), None)}, protocol=4),
    pickle.dumps({"s/v/00001": CraftedArray((np.ndarray, (0,), b"b"),
                                            (1, None, np.dtype("f4"), False, bytes(8)))}, protocol=4),
    # NEWOBJ: the rebuild function instantiated like a class, without arguments
    b"\x80\x04}\x94\x8c\ts/v/00001\x94cnumpy._core.multiarray\n_reconstruct\n)\x81\x94s.",
], ids=["bad shape argument", "bad shape in state", "no arguments"])
def test_pickle_of_a_crafted_array_is_one_line(tmp_path, blob):
    """A pickle calling numpy's rebuild in ways numpy refuses gives DataError, not a crash."""
    (tmp_path / "x.pk").write_bytes(blob)
    with pytest.raises(DataError, match="x.pk: not a readable pickle"):
        scoring.load_embeddings(str(tmp_path / "x.pk"))


class Rot13:
    def __reduce__(self):  # the byte encoder of protocols 0-2, with a codec other than latin-1
        return codecs.encode, ("s/v/00001", "rot13")


def test_pickle_encoding_text_other_than_latin1_is_refused(tmp_path):
    (tmp_path / "x.pk").write_bytes(pickle.dumps({"s/v/00001": Rot13()}, protocol=2))
    with pytest.raises(DataError, match="x.pk: not loaded, refused to load _codecs.encode with 'rot13'"):
        scoring.load_embeddings(str(tmp_path / "x.pk"))


def test_pickle_of_empty_vectors_is_one_line(tmp_path):
    common.write_pickle_atomic({"s/v/00001": np.zeros(0, np.float32)}, str(tmp_path / "e.pk"))
    with pytest.raises(DataError, match="e.pk: the embeddings are empty vectors"):
        scoring.load_embeddings(str(tmp_path / "e.pk"))


def test_pickle_of_wrong_content_is_refused(tmp_path):
    common.write_pickle_atomic({"k": np.zeros((2, 2))}, str(tmp_path / "m.pk"))
    with pytest.raises(DataError, match="expected 1-D real vectors"):
        scoring.load_embeddings(str(tmp_path / "m.pk"))


# --- extraction, verification -------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_thread():
    """The tiny network gains nothing from threads, and on a busy machine two spinning OpenMP
    threads make each small op wait for a descheduled peer (seconds per test instead of 0.1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_corpus, one_thread):
    """A tiny network with the batch-norm running statistics of a trained one: a few training-mode
    passes over the corpus' TTA segments. (With the init's mean 0 / variance 1 the untrained
    network's activations reach the hundreds, and float32 rounding alone then moves embeddings by
    more than 1e-5 between batch sizes, on either path.)"""
    torch.manual_seed(0)
    model = RawNet2(TINY)
    model.apply(utils.init_weights)
    folder = os.path.join(tiny_corpus, "VoxCeleb1", "eval_wav")
    segments = np.concatenate([utils.tta_segments(utils.read_wav(os.path.join(folder, key)),
                                                  TINY["nb_samp"], 1000)
                               for key in utils.list_utterances(folder)])
    with torch.no_grad():
        for batch in torch.split(torch.from_numpy(segments), 8):
            model.embed(batch)
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
    torch.save(model.state_dict(), path)
    return path, model.eval()


def extract_flags(corpus, folder, checkpoint, *extra):
    return ["-extract", "-model_dir", checkpoint, "-DB", os.path.join(corpus, "VoxCeleb1"),
            "-window_size", "1000", "-nb_worker", "0", "-embd_dir", str(folder), "-eer_file",
            str(folder / "eers.txt"), "-trials", os.path.join(corpus, "VoxCeleb1", "veri_test.txt"), *extra]


def one_segment_at_a_time(model, path, window_size=1000, fast=True):
    """Reference TTA embedding: each segment through the network alone, then the mean (by default
    through the fast path, as -extract runs by default)."""
    segments = utils.tta_segments(utils.read_wav(path), model.nb_samp, window_size)
    model = fast_RawNet2.accelerate(copy.deepcopy(model), fast)
    with torch.no_grad():
        return np.mean([model.embed(torch.from_numpy(s[None].copy()))[0].numpy() for s in segments], axis=0)


def test_extract_batched_equals_one_at_a_time_and_pickle_format(tiny_corpus, tiny_checkpoint, tmp_path,
                                                                capsys):
    checkpoint, model = tiny_checkpoint
    results = run(extract_flags(tiny_corpus, tmp_path, checkpoint, "-bs", "16"))
    out = capsys.readouterr().out
    assert "dev_wav/ not found: no dev embeddings" in out and "veri_test evaluation EER: " in out
    assert results["veri_test"]["eer"] == pytest.approx(
        loop_eer(os.path.join(tiny_corpus, "VoxCeleb1", "veri_test.txt"), scoring.load_embeddings(
            str(tmp_path / "TTA_vox1_eval.pk"))), abs=1e-9)  # the original method on the written pickle
    assert not (tmp_path / ".partial").exists() and not (tmp_path / "TTA_vox1_dev.pk").exists()
    with open(tmp_path / "TTA_vox1_eval.pk", "rb") as f:
        emb = pickle.load(f)  # a plain dict, readable by the original script
    eval_dir = os.path.join(tiny_corpus, "VoxCeleb1", "eval_wav")
    keys = utils.list_utterances(eval_dir)
    assert sorted(emb) == [k[:-4] for k in keys]
    for key in keys:
        code = emb[key[:-4]]
        assert code.dtype == np.float32 and code.shape == (16,)
        np.testing.assert_allclose(code, one_segment_at_a_time(model, os.path.join(eval_dir, key)), atol=1e-5)
        # and the plain reference network, which the fast path equals to float32 rounding
        reference = one_segment_at_a_time(model, os.path.join(eval_dir, key), fast=False)
        assert np.linalg.norm(code - reference) <= 1e-4 * np.linalg.norm(reference)


def test_extract_npy_matches_pickle(tiny_corpus, tiny_checkpoint, tmp_path):
    checkpoint, _ = tiny_checkpoint
    run(extract_flags(tiny_corpus, tmp_path / "pk", checkpoint))
    run(extract_flags(tiny_corpus, tmp_path / "npy", checkpoint, "-format", "npy"))
    from_pk = scoring.load_embeddings(str(tmp_path / "pk" / "TTA_vox1_eval.pk"))
    from_npy = scoring.load_embeddings(str(tmp_path / "npy" / "TTA_vox1_eval.npy"))
    assert sorted(from_pk) == sorted(from_npy)
    for k in from_pk:
        np.testing.assert_array_equal(from_npy[k], from_pk[k])


def test_a_partial_extraction_whose_fingerprint_is_not_json_is_one_line(tmp_path):
    (tmp_path / "fingerprint.json").write_text('{"model_sha256": "ab')
    with pytest.raises(DataError, match=rf"fingerprint.json: not the JSON fingerprint an extraction writes; "
                                        rf"delete {tmp_path} to start the extraction over"):
        ev.open_partial(str(tmp_path), {"model_sha256": "ab"})


def test_interrupted_extraction_resumes_without_recomputing(tiny_corpus, tiny_checkpoint, tmp_path,
                                                            monkeypatch):
    checkpoint, _ = tiny_checkpoint
    run(extract_flags(tiny_corpus, tmp_path / "full", checkpoint))
    computed, original = [], tta.iter_embeddings

    def interrupted(*args, **kwargs):
        for i, item in enumerate(original(*args, **kwargs)):
            if i == 5:
                raise KeyboardInterrupt
            computed.append(item[0])
            yield item

    monkeypatch.setattr(ev, "PARTIAL_SYNC_RECORDS", 1)
    monkeypatch.setattr(tta, "iter_embeddings", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(extract_flags(tiny_corpus, tmp_path / "cut", checkpoint))
    assert len(computed) == 5 and os.listdir(tmp_path / "cut" / ".partial")

    def counting(*args, **kwargs):
        for item in original(*args, **kwargs):
            computed.append(item[0])
            yield item

    monkeypatch.setattr(tta, "iter_embeddings", counting)
    run(extract_flags(tiny_corpus, tmp_path / "cut", checkpoint))
    assert len(computed) == 12 and len(set(computed)) == 12  # 5 before, the other 7 after: none twice
    full = scoring.load_embeddings(str(tmp_path / "full" / "TTA_vox1_eval.pk"))
    cut = scoring.load_embeddings(str(tmp_path / "cut" / "TTA_vox1_eval.pk"))
    assert sorted(full) == sorted(cut)
    for k in full:
        np.testing.assert_allclose(cut[k], full[k], atol=1e-6)


def test_embed_utterance_long_recording_in_batches(tiny_checkpoint):
    _, model = tiny_checkpoint
    wav = np.random.default_rng(0).standard_normal(30000).astype(np.float32)  # 10 segments
    whole = tta.embed_utterance(model, wav, window_size=1000, segments_per_batch=32)
    np.testing.assert_allclose(tta.embed_utterance(model, wav, window_size=1000, segments_per_batch=3),
                               whole, atol=1e-5)
    with torch.no_grad():
        segments = torch.from_numpy(utils.tta_segments(wav, 4000, 1000).copy())
        np.testing.assert_allclose(whole, model.embed(segments).mean(0).numpy(), atol=1e-5)


def test_embed_utterance_takes_the_window_size_the_checkpoint_records(tiny_checkpoint):
    model = copy.deepcopy(tiny_checkpoint[1])
    wav = np.random.default_rng(1).standard_normal(20000).astype(np.float32)
    model.checkpoint_args = {"window_size": 1500}  # as a last.pt of train_RawNet2.py records it
    np.testing.assert_array_equal(tta.embed_utterance(model, wav),
                                  tta.embed_utterance(model, wav, window_size=1500))
    model.checkpoint_args = {}  # a plain state_dict: the paper's 11810, too long for 4000-sample segments
    with pytest.raises(DataError, match="-window_size 11810: must be from 0 to 3999"):
        tta.embed_utterance(model, wav)


def test_an_embedding_the_network_overflows_is_one_line_naming_the_file(tiny_corpus, tiny_checkpoint):
    model = copy.deepcopy(tiny_checkpoint[1])
    with torch.no_grad():
        model.fc1_gru.weight.fill_(3e38)  # finite weights whose products overflow float32
    folder = os.path.join(tiny_corpus, "VoxCeleb1", "eval_wav")
    key = utils.list_utterances(folder)[0]
    with pytest.raises(DataError, match=f"^{os.path.join(folder, key)}: its embedding holds NaN or inf"):
        list(tta.iter_embeddings(model, [key], folder, model.nb_samp, 1000))
    with pytest.raises(DataError, match="^the waveform: its embedding holds NaN or inf"):
        tta.embed_utterance(model, np.ones(5000, np.float32), window_size=1000)


def test_bf16_extraction_is_close_not_identical(tiny_corpus, tiny_checkpoint):
    _, model = tiny_checkpoint
    folder = os.path.join(tiny_corpus, "VoxCeleb1", "eval_wav")
    wav = utils.read_wav(os.path.join(folder, utils.list_utterances(folder)[0]))  # in-domain audio
    full = tta.embed_utterance(model, wav, window_size=1000)
    half = tta.embed_utterance(model, wav, window_size=1000, bf16=True)
    assert not np.array_equal(full, half)
    assert cos_sim(full, half) > 0.99


def test_bf16_keeps_the_sinc_front_end_in_float32(tiny_checkpoint):
    _, model = tiny_checkpoint
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = output.dtype
        return hook

    hooks = [model.get_submodule(name).register_forward_hook(record(name))
             for name in ("first_conv", "block1.0.conv1")]
    with torch.no_grad(), utils.amp_autocast("cpu", "bf16"):
        model.embed(torch.randn(2, 4000))
    for hook in hooks:
        hook.remove()
    assert seen == {"first_conv": torch.float32, "block1.0.conv1": torch.bfloat16}
    assert not model.first_conv._forward_hooks and not model.first_conv._forward_pre_hooks
    assert not torch.is_autocast_enabled("cpu")


def test_verify_prints_score_and_decision(tiny_corpus, tiny_checkpoint, capsys):
    checkpoint, model = tiny_checkpoint
    eval_dir = os.path.join(tiny_corpus, "VoxCeleb1", "eval_wav")
    a, b = (os.path.join(eval_dir, k) for k in utils.list_utterances(eval_dir)[:2])
    expected = cos_sim(one_segment_at_a_time(model, a, 1000).astype(float),
                       one_segment_at_a_time(model, b, 1000).astype(float))
    flags = ["-verify", a, b, "-model_dir", checkpoint, "-window_size", "1000"]
    assert run(flags) == pytest.approx(expected, abs=1e-5)
    assert "pass -threshold" in capsys.readouterr().out
    run(flags + ["-threshold", str(expected - 1e-3)])
    assert capsys.readouterr().out.endswith(f": same speaker (threshold {expected - 1e-3})\n")
    run(flags + ["-threshold", str(expected + 1e-3)])
    assert ": different speakers" in capsys.readouterr().out


def test_wrong_checkpoint_is_one_line_error_without_traceback(tmp_path):
    torch.save({"ln.gamma": torch.ones(10)}, tmp_path / "bad.pt")
    wav = tmp_path / "a.wav"
    sf.write(wav, np.sin(np.arange(8000) / 5.0), 16000)
    proc = subprocess.run([sys.executable, "evaluate_pretrained_RawNet2.py", "-verify", str(wav), str(wav),
                           "-model_dir", str(tmp_path / "bad.pt")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "bad.pt" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# --- DET plot -----------------------------------------------------------------------------------

def test_checkpoint_with_non_string_keys_is_one_line(tmp_path):
    torch.save({1: torch.ones(3)}, tmp_path / "ints.pt")
    with pytest.raises(DataError, match=r"ints.pt: not a state_dict"):
        run(["-verify", "a.wav", "b.wav", "-model_dir", str(tmp_path / "ints.pt")])


def test_sinc_filter_longer_than_the_segment_allows_is_one_line(tmp_path):
    torch.save(RawNet2(TINY).state_dict(), tmp_path / "tiny.pt")
    # 4000 samples leave room for 4000 - 3 ** 7 = 1813 taps: 1815 would leave no GRU step
    with pytest.raises(DataError, match=r"first_conv 1815 taps needs segments of at least 4001 samples"):
        run(["-verify", "a.wav", "b.wav", "-model_dir", str(tmp_path / "tiny.pt"), "-m_first_conv", "1815",
             "-window_size", "1000"])


def test_meta_device_is_one_line():
    with pytest.raises(DataError, match=r"-device meta: not usable here"):
        run(["-verify", "a.wav", "b.wav", "-device", "meta"])


def test_plot_without_matplotlib_says_so(scored_dir, monkeypatch):
    folder, _ = scored_dir
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(DataError, match="-plot needs matplotlib.*pip install matplotlib"):
        run(score_flags(folder) + ["-plot", str(folder / "det")])


def test_plot_writes_a_det_png_per_list(scored_dir):
    pytest.importorskip("matplotlib")
    folder, _ = scored_dir
    run(score_flags(folder) + ["-plot", str(folder / "det")])
    pngs = sorted(os.listdir(folder / "det"))
    assert pngs == ["list_test_all_cleaned.png", "list_test_hard_cleaned.png", "vox_original.png"]
    assert (folder / "det" / pngs[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
