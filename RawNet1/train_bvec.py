"""Train the b-vector back-end on RawNet embeddings and score Vox1-O next to the cosine baseline.

    python RawNet1/train_bvec.py -embeddings DNNs/rawnet1/embeddings.pk

Reproduces the b-vector DNN of Jung et al., "RawNet: Advanced end-to-end deep neural network using raw
waveforms for text-independent speaker verification" (Interspeech 2019), after Lee et al.'s b-vectors,
as the authors' Keras code (02-trn_bvec) trains it: embeddings standardised with the dev set's mean
and std; dropout 0.2 on each input embedding; the pair represented as concat(a + b, a - b, a * b);
4 x (dense 1,024, dropout 0.5, LeakyReLU 0.3); softmax over {different, same}; kernels
uniform in [-0.05, 0.05] with L2 5e-5; Adam (AMSGrad, lr 0.001, decay 1e-4 per step); 1,000 epochs of
1,000 batches of 120 pairs of dev utterances: 60 same-speaker pairs of 60 distinct speakers and 60
different-speaker pairs; the model is selected on the validation trials after every epoch.

Input: the pickle written by ``train_RawNet.py``, ``{'dev_dic_embeddings': ..., 'eval_dic_embeddings': ...}``;
validation trials over its dev utterances: ``-val_trial`` (default: ``val_trial.txt`` beside the
pickle, written by train_RawNet.py), or generated as train_RawNet.py does.
Outputs under ``-out_dir``: ``eers.txt`` (``epoch:E, val_eer:X`` per epoch, then the test EERs),
``bvec_best.pt`` (model, standardisation, args), ``results/{cosine,bvec}_eval.txt`` (``score target``).

The trial score is the log-odds of "same" (rank-equal to the softmax probability of "same").
Dimensions with zero dev std are left unscaled.
"""

import argparse
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (HERE, os.path.dirname(HERE)) if p not in sys.path]  # RawNet1/, repo root

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
import runs  # noqa: E402
import scoring  # noqa: E402
import utils  # noqa: E402
from common import DataError  # noqa: E402
from data_RawNet import TRIALS_FLAG, generate_validation_lines, read_trial_lines, trial_arrays  # noqa: E402
from model_RawNet import LEAKY_SLOPE, keras_decay_scheduler, keras_l2_groups  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(description="Train the b-vector back-end; Vox1-O EER vs cosine.")

    add = common.arg_group(parser, "run")
    add("embeddings", type=str, required=True, help="embeddings pickle written by train_RawNet.py")
    add("out_dir", type=str, default="", help="output folder (default: bvec/ beside -embeddings)")
    add("seed", type=int, default=1234, help="seed for initialisation, validation trials and pair sampling")
    add("progress", **common.PROGRESS_FLAG)

    add = common.arg_group(parser, "data")
    add("trials", **TRIALS_FLAG)
    add("val_trial", type=str, default="",
        help="validation trials over dev utterances (default: val_trial.txt beside -embeddings if present, "
             "else 8 trials per utterance of -nb_val_spk dev speakers, as train_RawNet.py generates them)")
    add("nb_val_spk", type=int, default=40, help="dev speakers of generated validation trials (0: all)")

    add = common.arg_group(parser, "optimisation")
    add("bs", type=int, default=120, help="pairs per batch, half same-speaker and half different-speaker")
    add("lr", type=float, default=0.001, help="Adam learning rate")
    add("amsgrad", **common.AMSGRAD_FLAG)
    add("lr_decay", type=float, default=1e-4, help="Keras decay per step: lr / (1 + decay * step)")
    add("wd", type=float, default=5e-5, help="Keras l2 on every dense kernel (loss + wd * sum w^2)")
    add("epoch", type=int, default=1000, help="epochs")
    add("nb_batch_per_epoch", type=int, default=1000, help="sampled batches per epoch")

    add = common.arg_group(parser, "model")
    add("m_hidden", type=int, default=1024, help="units of each hidden dense layer")
    add("m_nb_layer", type=int, default=4, help="hidden dense layers")
    add("m_in_dropout", type=float, default=0.2, help="dropout on each input embedding")
    add("m_dropout", type=float, default=0.5, help="dropout after each hidden dense layer")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


class UniformDropout(nn.Module):
    """Inverted dropout whose mask thresholds uniform noise, as Keras' dropout draws it: a value is
    kept where u >= rate, u ~ U[0, 1), and kept values are scaled by 1 / (1 - rate). The same
    distribution as ``nn.Dropout``, whose Bernoulli sampler is slow on CPU (bench/rawnet1_step.py
    times a b-vector training step with each). Identity in eval mode."""

    def __init__(self, rate):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if not self.training or self.rate == 0:
            return x
        return x * ((torch.rand_like(x) >= self.rate) * (1.0 / (1.0 - self.rate)))

    def extra_repr(self):
        return f"rate={self.rate}"


class BVectorDNN(nn.Module):
    """Pair classifier on b-vectors concat(a + b, a - b, a * b): logits over {different, same}."""

    def __init__(self, dim, hidden=1024, nb_layer=4, in_dropout=0.2, dropout=0.5):
        super().__init__()
        self.in_dropout = UniformDropout(in_dropout)
        layers, width = [], 3 * dim
        for _ in range(nb_layer):
            # dense -> dropout -> LeakyReLU, the Keras code's order (the two commute: LeakyReLU is
            # positively homogeneous)
            layers += [nn.Linear(width, hidden), UniformDropout(dropout), nn.LeakyReLU(LEAKY_SLOPE)]
            width = hidden
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(width, 2)

    def forward(self, a, b):  # (B, D), (B, D) -> (B, 2)
        a, b = self.in_dropout(a), self.in_dropout(b)
        return self.out(self.hidden(torch.cat([a + b, a - b, a * b], dim=1)))

    def reset_parameters(self):
        """The Keras code's initialisation: every dense kernel uniform in [-0.05, 0.05]
        (``RandomUniform``), zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.uniform_(module.weight, -0.05, 0.05)
                nn.init.zeros_(module.bias)

    @torch.no_grad()
    def score(self, a, b):
        """Log-odds of 'same speaker' (eval mode)."""
        logits = self(a, b)
        return logits[:, 1] - logits[:, 0]


def balanced_pairs(speaker_rows, batch_size, rng):
    """One batch of row-index pairs: ``batch_size // 2`` same-speaker pairs (two different utterances
    of each of ``batch_size // 2`` distinct speakers with at least two) and as many different-speaker
    pairs (one utterance each of two random speakers). ``speaker_rows``: one array of embedding-matrix
    rows per speaker. Returns (rows_a, rows_b, labels) with label 1 = same."""
    half = batch_size // 2
    multi = [rows for rows in speaker_rows if len(rows) >= 2]
    same = [rng.choice(multi[s], 2, replace=False) for s in rng.choice(len(multi), half, replace=False)]
    diff = [(rng.choice(speaker_rows[i]), rng.choice(speaker_rows[j]))
            for i, j in (rng.choice(len(speaker_rows), 2, replace=False) for _ in range(half))]
    pairs = np.array(same + diff).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1], np.repeat([1, 0], half)


def load_embeddings(path):
    if not os.path.isfile(path):
        raise DataError(f"{path}: embeddings pickle not found (train_RawNet.py writes "
                        "<save_dir>/<name>/embeddings.pk)")
    obj = scoring.load_pickle(path)  # restricted: a pickle may only hold containers and numpy arrays
    if not isinstance(obj, dict) or not {"dev_dic_embeddings", "eval_dic_embeddings"} <= set(obj):
        raise DataError(f"{path}: expected a dict with 'dev_dic_embeddings' and 'eval_dic_embeddings'")
    return (scoring.check_embeddings(obj["dev_dic_embeddings"], f"{path} (dev)"),
            scoring.check_embeddings(obj["eval_dic_embeddings"], f"{path} (eval)"))


def stack(embeddings, ids, what):
    matrix = np.stack([np.asarray(embeddings[k], dtype=np.float32) for k in ids])
    bad = [ids[i] for i in np.flatnonzero(~np.isfinite(matrix).all(1))]
    if bad:
        raise DataError(f"{len(bad)} {what} embeddings are non-finite, e.g. {', '.join(bad[:5])}")
    return matrix


def score_pairs(model, matrix, keys_a, keys_b, index, chunk=20000):
    """b-vector scores of trials (ids into ``index``, rows of the standardised ``matrix``)."""
    model.eval()
    ia = np.array([index[k] for k in keys_a])
    ib = np.array([index[k] for k in keys_b])
    return np.concatenate([model.score(matrix[ia[s:s + chunk]], matrix[ib[s:s + chunk]]).numpy()
                           for s in range(0, len(ia), chunk)])


def validation_lines(args, dev_ids):
    """``-val_trial``, else train_RawNet.py's ``val_trial.txt`` beside the pickle, else generated as
    train_RawNet.py generates them for the same ``-seed`` and ``-nb_val_spk``."""
    beside = os.path.join(os.path.dirname(os.path.abspath(args.embeddings)), "val_trial.txt")
    path = args.val_trial or (beside if os.path.isfile(beside) else "")
    if path:
        return read_trial_lines(path)
    return generate_validation_lines(dev_ids, args.nb_val_spk, 0, args.seed)


def make_training(dim, args):
    """The b-vector DNN with the Keras initialisation, Adam (AMSGrad) with l2 on every dense kernel,
    and the Keras decay stepped after every optimiser step."""
    model = BVectorDNN(dim, args.m_hidden, args.m_nb_layer, args.m_in_dropout, args.m_dropout)
    model.reset_parameters()
    optimizer = utils.adam(keras_l2_groups(model, args.wd), lr=args.lr, amsgrad=args.amsgrad)
    scheduler = keras_decay_scheduler(optimizer, args.lr_decay)
    return model, optimizer, scheduler


def check_flags(args):
    """One line naming the flag for a value no run can use."""
    checks = (("seed", 0 <= args.seed < 2 ** 32, "must be from 0 to 2**32 - 1"),
              ("lr", math.isfinite(args.lr) and args.lr > 0, "must be a positive number"),
              ("lr_decay", math.isfinite(args.lr_decay) and args.lr_decay >= 0, "must be a number >= 0"),
              ("wd", math.isfinite(args.wd) and args.wd >= 0, "must be a number >= 0"),
              ("m_hidden", args.m_hidden >= 1, "must be at least 1"),
              ("m_nb_layer", args.m_nb_layer >= 0, "must not be negative"),
              ("m_in_dropout", 0 <= args.m_in_dropout < 1, "must be from 0 to below 1"),
              ("m_dropout", 0 <= args.m_dropout < 1, "must be from 0 to below 1"),
              ("nb_val_spk", args.nb_val_spk >= 0, "must be 0 (all) or a speaker count"))
    for flag, ok, why in checks:
        if not ok:
            raise DataError(f"-{flag} {getattr(args, flag)}: {why}")


def main(args):
    """Check the flags, hold the output folder's lock, then train (``train``)."""
    if args.bs < 2 or args.bs % 2:
        raise DataError(f"-bs {args.bs}: a balanced batch needs an even number of pairs")
    if args.epoch < 1 or args.nb_batch_per_epoch < 1:
        raise DataError("-epoch and -nb_batch_per_epoch must be at least 1")
    check_flags(args)
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.embeddings)), "bvec")
    with runs.folder_lock(out_dir, "wait for it to end, or choose another -out_dir"):
        common.remove_temporaries(out_dir)  # of a killed run: never read, now removed
        return train(args, out_dir)


def train(args, out_dir):
    """Train on the dev embeddings, select on the validation trials, score Vox1-O; returns the EERs."""
    utils.seed_everything(args.seed)
    dev, test = load_embeddings(args.embeddings)
    trials = scoring.read_trials(args.trials)
    scoring.check_keys(trials[1] + trials[2], test, f"trial keys of {args.trials}")

    # Standardise with the dev set's statistics; pairs of every dev speaker, validation on trials among
    # some of those same speakers (as train_RawNet.py's validation: they stay in training).
    dev_ids = sorted(dev)
    dev_matrix = stack(dev, dev_ids, "dev")
    mean, std = dev_matrix.mean(0), dev_matrix.std(0)
    std = np.where(std > 0, std, 1.0).astype(np.float32)
    dev_std = torch.from_numpy((dev_matrix - mean) / std)
    row = {k: i for i, k in enumerate(dev_ids)}
    by_speaker = {}
    for k in dev_ids:
        by_speaker.setdefault(common.speaker_of(k), []).append(row[k])
    speaker_rows = [np.array(rows) for _, rows in sorted(by_speaker.items())]
    if sum(len(r) >= 2 for r in speaker_rows) < args.bs // 2:
        raise DataError(f"-bs {args.bs}: needs {args.bs // 2} dev speakers with two utterances or more, "
                        f"the embeddings have {sum(len(r) >= 2 for r in speaker_rows)}")
    val_trials = trial_arrays(validation_lines(args, dev_ids))
    scoring.check_keys(val_trials[1] + val_trials[2], dev, "validation trial keys (dev embeddings)")

    model, optimizer, scheduler = make_training(dev_matrix.shape[1], args)
    best_eer, best_state = np.inf, None
    best_path, eers_path = os.path.join(out_dir, "bvec_best.pt"), os.path.join(out_dir, "eers.txt")
    common.write_text_atomic("", eers_path)
    print(f"b-vector: {len(dev_ids)} training embeddings of {len(speaker_rows)} speakers, "
          f"{len(val_trials[0])} validation trials, {sum(p.numel() for p in model.parameters()):,} "
          "parameters")
    for epoch in range(args.epoch):
        model.train()
        rng = np.random.default_rng([args.seed, epoch])
        total = 0.0
        bar = tqdm(range(args.nb_batch_per_epoch), desc=f"b-vector epoch {epoch}", leave=False,
                   disable=not args.progress)
        for _ in bar:
            rows_a, rows_b, labels = balanced_pairs(speaker_rows, args.bs, rng)
            loss = F.cross_entropy(model(dev_std[rows_a], dev_std[rows_b]), torch.from_numpy(labels))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
        val_eer = scoring.compute_eer(val_trials[0], score_pairs(model, dev_std, *val_trials[1:], row))[0]
        line = f"epoch:{epoch}, loss:{total / args.nb_batch_per_epoch:.4f}, val_eer:{val_eer:.4f}"
        common.append_line(eers_path, line)
        if val_eer < best_eer:
            best_eer = val_eer
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
            runs.save_atomic({"model": best_state, "epoch": epoch, "mean": mean, "std": std,
                               "args": vars(args)}, best_path)
        tqdm.write(f"b-vector {line}")

    # Vox1-O: cosine on the raw embeddings, b-vector on the standardised ones with the selected model.
    labels, keys_a, keys_b = trials
    cosine = scoring.cosine_scores(test, keys_a, keys_b)
    test_ids = sorted(set(keys_a) | set(keys_b))
    test_std = torch.from_numpy((stack(test, test_ids, "test") - mean) / std)
    model.load_state_dict(best_state)
    bvec = score_pairs(model, test_std, keys_a, keys_b, {k: i for i, k in enumerate(test_ids)})
    eers = {"cosine": scoring.compute_eer(labels, cosine)[0], "bvec": scoring.compute_eer(labels, bvec)[0]}
    for name, scores in (("cosine", cosine), ("bvec", bvec)):
        common.write_text_atomic("".join(f"{s} {t}\n" for s, t in zip(scores, labels)),
                                os.path.join(out_dir, "results", f"{name}_eval.txt"))
    common.append_line(eers_path, f"test cosine_eer:{eers['cosine']:.4f}, bvec_eer:{eers['bvec']:.4f}")
    print(f"Vox1-O ({len(labels)} trials): cosine EER {100 * eers['cosine']:.2f} %, "
          f"b-vector EER {100 * eers['bvec']:.2f} %")
    return eers


if __name__ == "__main__":
    common.run_cli(lambda: main(parse_args()))
