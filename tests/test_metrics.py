"""The EER threshold that evaluate_pretrained_RawNet2.py prints and ``-verify -threshold`` takes:
hand-worked cases, its meaning under the accept rule ``score >= threshold``, and the printed line."""

import numpy as np
import pytest

import evaluate_pretrained_RawNet2 as ev
import scoring


def far_frr(labels, scores, threshold):
    """False-acceptance and false-rejection rates when a trial is accepted at ``score >= threshold``."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    return np.mean(scores[labels == 0] >= threshold), np.mean(scores[labels == 1] < threshold)


# Targets 0.9, 0.8, 0.7, 0.2 and non-targets 0.6, 0.1. Accepting at t = 0.7 misses one target of four
# and admits no non-target (FAR 0, FRR 1/4); the next operating point, t = 0.6, admits one non-target
# of two (FAR 1/2, FRR 1/4). Between them the ROC is flat at FRR 1/4, so FAR = FRR = 1/4 is reached
# halfway along: EER 1/4, at the threshold halfway between 0.7 and 0.6.
LABELS_A, SCORES_A = [1, 1, 1, 1, 0, 0], [0.9, 0.8, 0.7, 0.2, 0.6, 0.1]
# A tie: targets 0.9, 0.5, non-targets 0.5, 0.1. From t = 0.9 (FAR 0, FRR 1/2) to t = 0.5 (FAR 1/2,
# FRR 0) the tie moves both rates along one ROC segment, FRR = 1/2 - FAR: they meet at FAR = 1/4,
# the segment's midpoint, so the EER is 1/4 at the threshold halfway between 0.9 and 0.5.
LABELS_B, SCORES_B = [1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]


def test_eer_threshold_hand_worked_flat_segment():
    eer, threshold = scoring.compute_eer(LABELS_A, SCORES_A)
    assert eer == pytest.approx(0.25, abs=1e-9)
    assert threshold == pytest.approx(0.65, abs=1e-9)
    # at that threshold one target of four is rejected and no non-target accepted
    assert far_frr(LABELS_A, SCORES_A, threshold) == (0.0, 0.25)


def test_eer_threshold_hand_worked_tie():
    eer, threshold = scoring.compute_eer(LABELS_B, SCORES_B)
    assert eer == pytest.approx(0.25, abs=1e-9)
    assert threshold == pytest.approx(0.7, abs=1e-9)


def test_eer_threshold_does_not_depend_on_trial_order():
    order = [3, 0, 5, 1, 4, 2]
    labels, scores = np.array(LABELS_A)[order], np.array(SCORES_A)[order]
    assert scoring.compute_eer(labels, scores) == pytest.approx(scoring.compute_eer(LABELS_A, SCORES_A))


def test_accepting_at_the_eer_threshold_gives_the_eer_on_both_sides():
    # Many untied scores: the ROC's steps are 1/2000 wide, so at the threshold both error rates
    # are the EER to within a few steps.
    rng = np.random.default_rng(11)
    labels = np.repeat([1, 0], 2000)
    scores = rng.standard_normal(4000) + 1.5 * labels
    eer, threshold = scoring.compute_eer(labels, scores)
    far, frr = far_frr(labels, scores, threshold)
    assert abs(far - eer) < 0.005 and abs(frr - eer) < 0.005
    assert 0.2 < eer < 0.3  # two unit normals 1.5 apart: Phi(-0.75) = 0.227


def test_metrics_report_the_eer_threshold():
    result = ev.metrics(LABELS_A, SCORES_A)
    assert result["eer"] == pytest.approx(0.25, abs=1e-9)
    assert result["eer_threshold"] == pytest.approx(0.65, abs=1e-9)


def test_scoring_prints_the_hand_worked_threshold(tmp_path, capsys):
    # Two-dimensional embeddings whose cosine is each trial's score of case A.
    embeddings, lines = {}, []
    for i, (label, score) in enumerate(zip(LABELS_A, SCORES_A)):
        embeddings[f"id{i}/v/a"] = np.array([1.0, 0.0], dtype=np.float32)
        embeddings[f"id{i}/v/b"] = np.array([score, np.sqrt(1 - score ** 2)], dtype=np.float32)
        lines.append(f"{label} id{i}/v/a.wav id{i}/v/b.wav\n")
    scoring.save_embeddings(embeddings, str(tmp_path / "TTA_vox1_eval.pk"))
    (tmp_path / "vox_original.txt").write_text("".join(lines))
    ev.main(ev.parse_args(["-embd_dir", str(tmp_path), "-trial_dir", str(tmp_path),
                           "-eer_file", str(tmp_path / "eers.txt")]))
    out = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(out) if line.startswith("Vox original evaluation EER: "))
    assert float(out[at].split(": ")[1]) == pytest.approx(0.25, abs=1e-9)
    assert out[at + 1].endswith(", EER threshold 0.6500")
