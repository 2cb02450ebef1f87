"""scoring.py against independent references: scikit-learn's roc_curve, SciPy's brentq and interp1d
(the original EER method, bit for bit), a line-by-line trial parser, a float64 per-trial loop."""

import subprocess
import sys

import numpy as np
import pytest
from scipy.interpolate import interp1d
from scipy.optimize import brentq
from sklearn.metrics import roc_curve

import scoring
from common import DataError, write_pickle_atomic
from conftest import ROOT


def original_eer(labels, scores):
    """The original script's EER: sklearn's ROC, then brentq on an interp1d of it."""
    fpr, tpr, _ = roc_curve(labels, scores, pos_label=1)
    return brentq(lambda x: 1. - x - interp1d(fpr, tpr)(x), 0., 1.)


def score_sets():
    """Random score sets, many with ties (rounded scores, few distinct values), and edge cases."""
    rng = np.random.default_rng(0)
    for i in range(120):
        n = int(rng.integers(2, 2000))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        scores = rng.standard_normal(n) + rng.uniform(0, 3) * labels
        if i % 3 == 1:
            scores = np.round(scores, int(rng.integers(0, 3)))  # many ties
        elif i % 3 == 2:
            scores = rng.integers(0, int(rng.integers(1, 6)), n).astype(np.float64)  # a handful of values
        yield labels, scores
    yield np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.2, 0.1])  # separated: EER 0
    yield np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.8, 0.9])  # inverted: EER 1
    yield np.array([1, 0, 1, 0]), np.zeros(4)  # all tied
    yield np.array([0, 1]), np.array([-0.0, 0.0])  # signed zeros tie
    yield np.array([1, 0, 0]), np.array([0.5, 0.5, 0.5], dtype=np.float32)


def test_roc_curve_is_sklearns_bit_for_bit():
    for labels, scores in score_sets():
        for drop in (True, False):
            ours = scoring.roc_curve(labels, scores, drop_intermediate=drop)
            theirs = roc_curve(labels, scores, pos_label=1, drop_intermediate=drop)
            for a, b in zip(ours, theirs):
                np.testing.assert_array_equal(a, b)


def test_eer_is_the_original_methods_float_and_printed_line():
    for labels, scores in score_sets():
        eer = scoring.compute_eer(labels, scores)[0]
        expected = original_eer(labels, scores)
        assert eer == expected
        assert f"Vox original evaluation EER: {eer}" == f"Vox original evaluation EER: {expected}"


def test_one_sort_for_eer_and_min_dcf_gives_both_functions_results():
    for labels, scores in list(score_sets())[:30]:
        expected = (scoring.compute_eer(labels, scores),
                    scoring.compute_min_dcf(labels, scores, [0.01, 0.05]))
        assert scoring.eer_and_min_dcf(labels, scores, (0.01, 0.05)) == expected


def test_eer_threshold_is_interp1d_of_the_thresholds():
    rng = np.random.default_rng(1)
    labels, scores = rng.integers(0, 2, 500), rng.standard_normal(500)
    eer, threshold = scoring.compute_eer(labels, scores)
    fpr, _, thresholds = roc_curve(labels, scores, pos_label=1)
    assert threshold == float(interp1d(fpr, thresholds)(eer))


@pytest.mark.parametrize("f,a,b", [(lambda x: x ** 3 - 2 * x - 5, 2, 3), (np.cos, 0, 3),
                                   (lambda x: x - 1e-9, 0, 1), (lambda x: np.exp(x) - 10, -5, 5),
                                   (lambda x: (x - 0.3) ** 3, 0, 1),
                                   (lambda x: 0.0 if x >= 0.5 else -1.0, 0, 1)])
def test_brentq_is_scipys_bit_for_bit(f, a, b):
    assert scoring.brentq(f, a, b) == brentq(f, a, b)


def test_brentq_needs_a_sign_change():
    with pytest.raises(ValueError, match="different signs"):
        scoring.brentq(lambda x: x * x + 1, -1, 1)


# --- trial lists --------------------------------------------------------------------------------

def slow_read(path):
    """Line by line, independently: (labels, keysA, keysB) with .wav removed."""
    labels, keys_a, keys_b = [], [], []
    with open(path) as f:
        for line in f:
            if line.split():
                label, a, b = line.split()
                labels.append(int(label))
                keys_a.append(a.removesuffix(".wav"))
                keys_b.append(b.removesuffix(".wav"))
    return labels, keys_a, keys_b


def vox_lines(rng, n, wav_a=".wav", wav_b=".wav"):
    keys = [f"id{10270 + s}/{'abcdefghijk'[s % 11] * 11}/{u:05d}" for s in range(6) for u in range(1, 8)]
    pick = rng.integers(0, len(keys), (n, 2))
    return [f"{rng.integers(0, 2)} {keys[a]}{wav_a} {keys[b]}{wav_b}\n" for a, b in pick]


@pytest.mark.parametrize("variant", ["vox", "no_wav", "one_side_wav", "no_final_newline", "crlf",
                                     "blank_line", "tabs", "mixed_wav", "uneven_lengths", "unicode"])
def test_trial_list_parsers_agree(tmp_path, variant):
    rng = np.random.default_rng(2)
    suffixes = {"no_wav": ("", ""), "one_side_wav": (".wav", "")}.get(variant, (".wav", ".wav"))
    lines = vox_lines(rng, 300, *suffixes)
    text = "".join(lines)
    text = {"no_final_newline": text.rstrip("\n"), "crlf": text.replace("\n", "\r\n"),
            "blank_line": text.replace("\n", "\n\n", 1), "tabs": text.replace(" ", "\t", 1),
            "mixed_wav": text.replace(".wav", "", 3), "uneven_lengths": text + "1 a/b/1 a/b/2\n",
            "unicode": text + "0 ä/b/00001.wav ä/b/00002.wav\n"}.get(variant, text)
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode())
    labels, keys, index_a, index_b = scoring.read_trial_list(str(path))
    expected = slow_read(path)
    assert labels.tolist() == expected[0]
    assert [keys[i] for i in index_a] == expected[1] and [keys[i] for i in index_b] == expected[2]
    assert len(set(keys)) == len(keys)  # each utterance once, whether written with .wav or not
    assert scoring.read_trials(str(path))[1:] == expected[1:]


def test_trial_keys_with_one_hash_still_parse(tmp_path, monkeypatch):
    monkeypatch.setattr(scoring, "_KEY_HASH_MULTIPLIER", np.uint64(0))  # every key hashes to its last 8 bytes
    path = tmp_path / "t.txt"
    path.write_text("1 aaaaaaaa/x/00001 bbbbbbbb/x/00001\n0 aaaaaaaa/x/00001 cccccccc/x/00002\n")
    _, keys, index_a, index_b = scoring.read_trial_list(str(path))
    assert ([keys[i] for i in index_a], [keys[i] for i in index_b]) == (
        ["aaaaaaaa/x/00001", "aaaaaaaa/x/00001"], ["bbbbbbbb/x/00001", "cccccccc/x/00002"])


@pytest.mark.parametrize("line", ["2 a/b/1 a/b/2", "1 a/b/1", "1 a/b/1 a/b/2 a/b/3", "x a/b/1 a/b/2"])
def test_bad_trial_line_is_named_in_either_parser(tmp_path, line):
    path = tmp_path / "t.txt"
    path.write_text("1 a/b/1 a/b/2\n" + line + "\n")
    with pytest.raises(DataError, match=r"t.txt:2: expected '<1\|0> <keyA> <keyB>'"):
        scoring.read_trial_list(str(path))


# --- embeddings and cosine scores ---------------------------------------------------------------

def test_cosine_in_float64_equals_a_float64_loop():
    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((50, 64)).astype(np.float32)
    table = scoring.EmbeddingTable([f"k{i}" for i in range(50)], matrix)
    rows_a, rows_b = rng.integers(0, 50, 1000), rng.integers(0, 50, 1000)
    got = table.cosine(rows_a, rows_b, chunk=7)
    m64 = matrix.astype(np.float64)
    loop = [np.dot(m64[a], m64[b]) / (np.linalg.norm(m64[a]) * np.linalg.norm(m64[b]))
            for a, b in zip(rows_a, rows_b)]
    np.testing.assert_allclose(got, loop, rtol=1e-13, atol=1e-15)


def test_table_of_two_files_later_file_wins(tmp_path):
    first = {"a/v/1": np.ones(3, np.float32), "b/v/1": np.arange(3, dtype=np.float64)}
    write_pickle_atomic(first, str(tmp_path / "1.pk"))
    write_pickle_atomic({"a/v/1.wav": np.full(3, 2, np.float32)}, str(tmp_path / "2.pk"))
    table = scoring.EmbeddingTable.read([str(tmp_path / "1.pk"), str(tmp_path / "2.pk")])
    np.testing.assert_array_equal(table.matrix[table.index["a/v/1"]], [2, 2, 2])
    np.testing.assert_array_equal(table.matrix[table.index["b/v/1"]], [0, 1, 2])
    write_pickle_atomic({"c/v/1": np.ones(4, np.float32)}, str(tmp_path / "3.pk"))
    with pytest.raises(DataError, match="3.pk: 4-dimensional embeddings"):
        scoring.EmbeddingTable.read([str(tmp_path / "1.pk"), str(tmp_path / "3.pk")])


def test_scoring_run_imports_neither_torch_nor_sklearn_nor_scipy(tmp_path):
    write_pickle_atomic({f"id1/v/{i:05d}": np.eye(4, dtype=np.float32)[i % 4] + 0.1 for i in range(8)},
                        str(tmp_path / "TTA_vox1_eval.pk"))
    (tmp_path / "vox_original.txt").write_text("1 id1/v/00000.wav id1/v/00004.wav\n"
                                               "0 id1/v/00000.wav id1/v/00001.wav\n")
    code = ("import sys, evaluate_pretrained_RawNet2 as ev\n"
            f"ev.main(ev.parse_args(['-embd_dir', {str(tmp_path)!r}, '-trial_dir', {str(tmp_path)!r}, "
            f"'-eer_file', {str(tmp_path / 'eers.txt')!r}]))\n"
            "print(sorted(m for m in ('torch', 'sklearn', 'scipy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert "Vox original evaluation EER: 0.0" in out
    assert out.splitlines()[-1] == "[]"


def test_help_names_the_device_default():
    out = subprocess.run([sys.executable, "evaluate_pretrained_RawNet2.py", "-h"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "-device" in out and "cuda if available, else cpu" in " ".join(out.split())


def test_trials_without_drops_exactly_the_trials_using_a_skipped_file():
    trials = (np.array([1, 0, 1, 0]), ["a/v/1", "a/v/1", "b/v/1", "c/v/1"],
              ["a/v/2", "b/v/1", "b/v/2", "a/v/2"])
    (labels, keys_a, keys_b), dropped = scoring.trials_without(trials, ["b/v/1.wav"])
    assert dropped == 2 and labels.tolist() == [1, 0]
    assert keys_a == ["a/v/1", "c/v/1"] and keys_b == ["a/v/2", "a/v/2"]
    assert scoring.trials_without(trials, []) == (trials, 0)
