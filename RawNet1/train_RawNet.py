"""Train RawNet (RawNet1): phase 1 (pre-training), then phase 2 (GRU) initialised from it; write the
embeddings pickle of the best model. Or ``-recipe vox2_baseline``: the simpler PyTorch baseline.

    python RawNet1/train_RawNet.py -name rawnet1                           # paper recipe, VoxCeleb1 dev
    python RawNet1/train_RawNet.py -name base -recipe vox2_baseline        # PyTorch VoxCeleb2 baseline
    python RawNet1/train_RawNet.py -name demo -demo                        # synthetic corpus, CPU, minutes

Reproduces the training of Jung et al., "RawNet: Advanced end-to-end deep neural network using raw
waveforms for text-independent speaker verification" (Interspeech 2019) as the authors' Keras code
runs it (its yaml's values are the defaults), and their PyTorch VoxCeleb2 baseline.
Input: the output of ``pre_process_waveforms.py`` (int16-scale, pre-emphasised .npy files).

Each phase: random ``nb_samp`` crops of every dev speaker; loss = softmax cross-entropy +
``bs_lambda`` x between-speaker loss + ``c_lambda`` x center loss (centers updated with rate 0.5);
Adam (AMSGrad); after every epoch the cosine EER on the validation trials (model selection) and,
every ``-eval_every`` epochs (1, as the original code), on Vox1-O (reported). Validation, as the
Keras code: the trials of ``-val_trial`` (its ``voxceleb1_val.txt`` layout), or 8 trials per
utterance of ``-nb_val_spk`` dev speakers who stay in training, scored with whole-utterance
embeddings; for vox2_baseline, as the PyTorch code: 40,000 random VoxCeleb1-dev trials scored with
embeddings of random crops. Outputs under ``<save_dir>/<name>/``: ``f_params.txt``, ``args.json``,
``val_trial.txt``, ``eers.txt`` (``phase:P, epoch:E, val_eer:X, eval_eer:Y``; no ``eval_eer`` in an
epoch that did not score Vox1-O), ``results/<phase>_eval_epoch<E>.txt`` (``score target``),
``models/<phase>_best.pt``, ``last.pt`` (resume with ``-resume``), and at the end ``embeddings.pk``:
``{'dev_dic_embeddings': {id: vector}, 'eval_dic_embeddings': {id: vector}}`` (ids without ``.wav``).

Added, none of which changes the recipe: ``last.pt`` and ``-resume`` (``eers.txt`` rewritten to the
epochs ``last.pt`` covers), crops drawn from (seed, phase, epoch, item), ``-demo``, a lock on the run
folder, checkpoints read with ``weights_only=True``, bad data stopping with one clear line.
"""

import argparse
import math
import os
import re
import sys
from collections import namedtuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (HERE, os.path.dirname(HERE)) if p not in sys.path]  # RawNet1/, repo root

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
import runs  # noqa: E402
import scoring  # noqa: E402
import utils  # noqa: E402
from common import DataError, TrainingError  # noqa: E402
from data_RawNet import (  # noqa: E402
    TRIALS_FLAG,
    CropSet,
    embed_utterances,
    generate_validation_lines,
    load_index,
    read_trial_lines,
    read_vox1_meta,
    trial_arrays,
    usable_trials,
)
from model_RawNet import (  # noqa: E402
    CenterLoss,
    RawNet,
    RawNetBaseline,
    RawNetPretrain,
    between_speaker_loss,
    init_from_pretrained,
    keras_decay_scheduler,
    keras_init,
    keras_l2_groups,
)

# Defaults that differ for the PyTorch VoxCeleb2 baseline (its train_RawNet.yaml): every speaker of
# -dev_dir in training (6,112 from DB/VoxCeleb2/wav/: VoxCeleb2 dev + test), 40,000 random VoxCeleb1-dev
# validation trials scored on random crops.
RECIPE_DEFAULTS = {
    "rawnet1": {},
    "vox2_baseline": {"dev_dir": "DB/VoxCeleb2/npy/", "val_dir": "DB/VoxCeleb1/dev_npy/", "nb_val_spk": 0,
                      "nb_val_trial": 40000, "val_crop": True, "bs": 120, "epoch": 40, "lr_decay": 5e-5,
                      "bs_lambda": 0.0, "c_lambda": 0.0, "m_nb_code": 1024},
}
# -demo: the built-in synthetic corpus and a scaled-down configuration (shorter crops, 32/64 channels,
# GRU 128, 4 + 8 epochs, 10 validation speakers, Vox1-O scored once, on the final model); the rest
# of the pipeline is the recipe's.
DEMO_ROOT = "DB/demo"
DEMO_DEFAULTS = {
    "dev_dir": f"{DEMO_ROOT}/RawNet1/dev_npy/", "eval_dir": f"{DEMO_ROOT}/RawNet1/eval_npy/",
    "trials": f"{DEMO_ROOT}/VoxCeleb1/veri_test.txt", "nb_samp": 19683, "nb_val_spk": 10,
    "m_filts": [32, 32, 64], "m_gru_node": 128, "m_nb_code": 128,
    "bs": 32, "epoch_pre": 4, "epoch": 8, "eval_every": 0, "nb_worker": 0,
}
DEMO_BVEC_FLAGS = ["-epoch", "5", "-nb_batch_per_epoch", "100"]

# decay_offset: the PyTorch baseline steps its scheduler before optimizer.step(), so its k-th update
# (from 0) already uses lr / (1 + decay * (k + 1)); Keras' decay uses k.
Phase = namedtuple("Phase", "name model epochs lr_decay decay_offset c_lambda init")


def int_list(v):
    """argparse type of a flat list flag of positive integers such as '[128,128,256]'."""
    try:
        value = common.literal_list(v)
    except argparse.ArgumentTypeError:
        value = None
    if not isinstance(value, list) or not all(isinstance(i, int) and i > 0 for i in value):
        raise argparse.ArgumentTypeError(f"expected a list of positive integers such as [128,128,256], "
                                         f"got {v!r}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train RawNet (Interspeech 2019): phase 1, phase 2, embeddings pickle.")

    flag = common.BOOL_FLAG
    add = common.arg_group(parser, "run")
    add("name", **common.RUN_NAME_FLAG)
    add("save_dir", **common.SAVE_DIR_FLAG)
    add("recipe", type=str, default="rawnet1", choices=sorted(RECIPE_DEFAULTS),
        help="rawnet1: the Keras code's two phases on VoxCeleb1 dev; vox2_baseline: the PyTorch baseline "
             "(cross-entropy only, GRU 1024 + dense 1024, batch 120, 40 epochs, decay 5e-5, every speaker "
             "of -dev_dir, selected on 40,000 VoxCeleb1-dev trials of random crops)")
    add("demo", action="store_true",
        help=f"synthesise the demo corpus under {DEMO_ROOT}/ (once), pre-process it, train a scaled-down "
             "model, then train and score the b-vector back-end; explicit flags still win")
    add("seed", type=int, default=1234,
        help="seed for initialisation, validation speakers and trials, shuffling and crops")
    add("nb_worker", type=int, default=8, help="DataLoader worker processes")
    add("nb_thread", type=int, default=0,
        help="CPU threads per operation (0: PyTorch's default, one per core); the count changes the "
             "order of float sums, so runs compare exactly only at one count")
    add("reproducible", default=True, help="seed torch/numpy/random, cuDNN deterministic", **flag)
    add("resume", **common.RESUME_FLAG)
    add("progress", **common.PROGRESS_FLAG)

    add = common.arg_group(parser, "data")
    add("dev_dir", type=str, default="DB/VoxCeleb1/dev_npy/",
        help="pre-processed training set (pre_process_waveforms.py output)")
    add("eval_dir", type=str, default="DB/VoxCeleb1/eval_npy/", help="pre-processed test set")
    add("trials", **TRIALS_FLAG)
    add("eval_every", type=int, default=1,
        help="score the test trials after every N-th epoch of a phase, for the record only (models are "
             "selected on the validation trials), as the original code does with 1; 0: only the final "
             "model, from the embeddings pickle")
    add("nb_samp", type=int, default=59049, help="samples per training crop (3.69 s)")
    add("val_dir", type=str, default="",
        help="pre-processed folder of the validation utterances; empty: -dev_dir")
    add("val_trial", type=str, default="",
        help="validation trials '<1|0> <keyA> <keyB>' with keys in -val_dir (e.g. the Keras code's "
             "scp/voxceleb1_val.txt, with -vox1_meta); default: generated, see -nb_val_spk, -nb_val_trial")
    add("vox1_meta", type=str, default="",
        help="VoxCeleb1's vox1_meta.csv: translate -val_trial keys of the first VoxCeleb1 release "
             "('<name>/<video>_<NNNNNNN>.wav') into '<id>/<video>/<NNNNN>.wav'")
    add("nb_val_spk", type=int, default=40,
        help="speakers of -val_dir whose utterances make the generated validation trials (0: all); "
             "they stay in training, as in the original code")
    add("nb_val_trial", type=int, default=0,
        help="0: 8 trials per utterance of those speakers (4 target, 4 non-target, the layout of the "
             "Keras code's voxceleb1_val.txt); N: N random trials, half target (the PyTorch code's way)")
    add("val_crop", default=False, **flag,
        help="validation embeddings of one random -nb_samp crop per utterance (the PyTorch baseline) "
             "instead of the whole utterance")

    add = common.arg_group(parser, "optimisation")
    add("bs", type=int, default=102, help="batch size")
    add("lr", type=float, default=0.001, help="Adam learning rate")
    add("amsgrad", **common.AMSGRAD_FLAG)
    add("wd", type=float, default=0.0001,
        help="L2: rawnet1 = Keras l2 regulariser on kernels (loss + wd * sum w^2); "
             "vox2_baseline = PyTorch weight decay, 0 for parameters named 'bn'")
    add("epoch_pre", type=int, default=100, help="phase-1 (pre-training) epochs (rawnet1 only)")
    add("epoch", type=int, default=100, help="phase-2 epochs (rawnet1), or epochs of vox2_baseline")
    add("lr_decay_pre", type=float, default=0.0, help="Keras time-based decay per step in phase 1")
    add("lr_decay", type=float, default=1e-4, help="Keras decay per step: lr / (1 + decay * step), phase 2")
    add("bs_lambda", type=float, default=1.0, help="weight of the between-speaker loss")
    add("c_lambda", type=float, default=0.001, help="weight of the center loss in phase 1 (0: off)")
    add("c_lambda_gru_scale", type=float, default=0.01, help="phase-2 center weight = c_lambda * this")
    add("c_alpha", type=float, default=0.5, help="center update rate")

    add = common.arg_group(parser, "model")
    add("m_filts", type=int_list, default=[128, 128, 256],
        help="channels: [strided conv, blocks 1-2, blocks 3-6]")
    add("m_blocks", type=int_list, default=[2, 4], help="residual blocks per stage")
    add("m_gru_node", type=int, default=1024, help="GRU units")
    add("m_nb_code", type=int, default=128, help="embedding size (dense layer after GAP / GRU)")
    add("m_dropout", type=float, default=0.5, help="phase-1 dropout before global average pooling")
    add("m_gru_dropout", type=float, default=0.3, help="phase-2 GRU recurrent dropout")
    return parser


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    scan = argparse.ArgumentParser(add_help=False)
    scan.add_argument("-recipe", "--recipe", default="rawnet1")
    scan.add_argument("-demo", "--demo", action="store_true")
    known, _ = scan.parse_known_args(argv)
    parser = build_parser()
    parser.set_defaults(**RECIPE_DEFAULTS.get(known.recipe, {}))
    if known.demo:
        parser.set_defaults(**DEMO_DEFAULTS)
    return parser.parse_args(argv)


def model_args(args, nb_classes):
    return {"filts": args.m_filts, "nb_blocks": args.m_blocks, "gru_node": args.m_gru_node,
            "nb_code": args.m_nb_code, "dropout": args.m_dropout, "gru_dropout": args.m_gru_dropout,
            "nb_classes": nb_classes}


def make_phases(args):
    if args.recipe == "vox2_baseline":
        return [Phase("baseline", RawNetBaseline, args.epoch, args.lr_decay, 1, args.c_lambda,
                      utils.init_weights)]
    return [Phase("pretrain", RawNetPretrain, args.epoch_pre, args.lr_decay_pre, 0, args.c_lambda,
                  keras_init),
            Phase("gru", RawNet, args.epoch, args.lr_decay, 0, args.c_lambda * args.c_lambda_gru_scale,
                  keras_init)]


def make_optimizer(model, args):
    """Adam (AMSGrad): PyTorch weight decay (0 for 'bn' parameters) for vox2_baseline; Keras' l2 on every
    kernel (conv, dense, GRU, speaker basis) for rawnet1."""
    if args.recipe == "vox2_baseline":
        groups = utils.param_groups(model, args.wd)
    else:
        groups = keras_l2_groups(model, args.wd)
    return utils.adam(groups, lr=args.lr, amsgrad=args.amsgrad)


def validation_lines(args, keys):
    """The validation trial lines: ``-val_trial``, or generated from ``keys`` (see the flags' help)."""
    if args.val_trial:
        return read_trial_lines(args.val_trial, read_vox1_meta(args.vox1_meta) if args.vox1_meta else None)
    return generate_validation_lines(keys, args.nb_val_spk, args.nb_val_trial, args.seed)


# What the checkpoints of this script hold at least: last.pt, and models/<phase>_best.pt.
LAST_KEYS = {"model", "center", "optimizer", "scheduler", "phase", "epoch", "best_eer", "rng"}
BEST_KEYS = {"model", "epoch"}


def load_checkpoint(path, what, keys):
    """A checkpoint of this script, loaded safely (``runs.load_torch_file``: tensors and plain
    containers only); a missing, corrupt or foreign file is one line naming ``path``."""
    state = runs.load_torch_file(path, what)
    missing = sorted(keys - set(state if isinstance(state, dict) else ()))
    if missing:
        raise DataError(f"{path}: not a {what} written by train_RawNet.py (it lacks {', '.join(missing)})")
    return state


def eers_before(path, phases, phase, epoch):
    """Lines of an eers.txt for the epochs before ``epoch`` of ``phases[phase]`` (the earlier phases'
    included): a resumed run drops the lines of epochs that its last.pt does not cover, so that no
    epoch is listed twice."""
    if not os.path.exists(path):
        return []
    order = {p.name: i for i, p in enumerate(phases)}
    with open(path) as f:
        lines = f.read().splitlines()
    matches = [(line, re.match(r"phase:(\w+), epoch:(\d+),", line)) for line in lines]
    return [line for line, m in matches
            if m and m[1] in order and (order[m[1]], int(m[2])) < (phase, epoch)]


# ---------------------------------------------------------------------------------------------

def train_epoch(model, center, loader, optimizer, scheduler, args, c_lambda, device, desc):
    """One pass over the training crops; returns the mean of each loss term."""
    model.train()
    totals, count = {}, 0
    bar = tqdm(loader, desc=desc, disable=not args.progress, leave=False, dynamic_ncols=True)
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        code, logits = model(x)
        parts = {"ce": F.cross_entropy(logits, y)}
        loss = parts["ce"]
        if args.bs_lambda:
            parts["bs"] = between_speaker_loss(model.speaker_weights)
            loss = loss + args.bs_lambda * parts["bs"]
        if center is not None:
            parts["center"] = center(code, y)
            loss = loss + c_lambda * parts["center"]
        if not torch.isfinite(loss):
            terms = ", ".join(f"{k} {v.item():.4g}" for k, v in parts.items())
            raise TrainingError(f"{desc}: non-finite loss ({terms})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if center is not None:
            center.update(code.detach(), y)  # Wen et al.'s rule, from this batch's embeddings
        count += 1
        for k, v in [("loss", loss)] + list(parts.items()):
            totals[k] = totals.get(k, 0.0) + v.item()
        bar.set_postfix(loss=f"{totals['loss'] / count:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    return {k: v / max(count, 1) for k, v in totals.items()}


def evaluate(model, trials, folder, args, device, desc, crop=None):
    """Embeddings of the trials' utterances (whole, or ``crop``: see ``UtteranceSet``), cosine scores, EER."""
    labels, keys_a, keys_b = trials
    keys = sorted(set(keys_a) | set(keys_b))
    embeddings = embed_utterances(model, [k + ".wav" for k in keys], folder, device, min(args.nb_worker, 4),
                                  args.progress, desc, crop)
    scores = scoring.cosine_scores(embeddings, keys_a, keys_b)
    return scoring.compute_eer(labels, scores)[0], scores


def check_flags(args, phases):
    """Flag values that no run can use: one line naming the flag."""
    run_dir = os.path.join(args.save_dir, args.name)
    if not args.name.strip() or (os.path.exists(run_dir) and not os.path.isdir(run_dir)):
        raise DataError(f"-name {args.name!r}: {run_dir} must be a folder name")
    if len(args.m_filts) != 3 or len(args.m_blocks) != 2:
        raise DataError(f"-m_filts needs 3 channel counts and -m_blocks 2 block counts, got {args.m_filts} "
                        f"and {args.m_blocks}")
    if any(p.epochs < 1 for p in phases):
        raise DataError("every phase needs at least one epoch (-epoch_pre, -epoch)")
    if args.eval_every < 0:
        raise DataError(f"-eval_every must be 0 (final model only) or a positive number of epochs, got "
                        f"{args.eval_every}")
    if args.nb_thread < 0:
        raise DataError(f"-nb_thread {args.nb_thread}: must be 0 (PyTorch's default) or a thread count")
    checks = (("seed", 0 <= args.seed < 2 ** 32, "must be from 0 to 2**32 - 1"),
              ("bs", args.bs >= 1, "must be at least 1"),
              ("lr", math.isfinite(args.lr) and args.lr > 0, "must be a positive number"),
              ("wd", math.isfinite(args.wd) and args.wd >= 0, "must be a number >= 0"),
              ("m_gru_node", args.m_gru_node >= 1, "must be at least 1"),
              ("m_nb_code", args.m_nb_code >= 1, "must be at least 1"),
              ("m_dropout", 0 <= args.m_dropout <= 1, "must be from 0 to 1"),
              ("m_gru_dropout", 0 <= args.m_gru_dropout <= 1, "must be from 0 to 1"),
              ("nb_val_spk", args.nb_val_spk >= 0, "must be 0 (all) or a speaker count"),
              ("nb_val_trial", args.nb_val_trial >= 0, "must be 0 or a trial count"),
              ("nb_worker", args.nb_worker >= 0, "must not be negative"))
    for flag, ok, why in checks:
        if not ok:
            raise DataError(f"-{flag} {getattr(args, flag)}: {why}")
    for phase in phases:
        shortest = phase.model.min_length(args.m_blocks)
        if args.nb_samp < shortest:
            raise DataError(f"-nb_samp {args.nb_samp} is too short for {phase.name} with -m_blocks "
                            f"{args.m_blocks}: it needs at least {shortest} samples")


def check_resume(args, phases, save_dir):
    """-resume needs a last.pt, and a run with one (or whose eers.txt lists completed epochs) is never
    silently started over."""
    last_path = os.path.join(save_dir, "last.pt")
    if args.resume and not os.path.exists(last_path):
        raise DataError(f"-resume: {last_path} not found (no completed epoch to continue from)")
    if not args.resume and os.path.exists(last_path):
        raise DataError(f"{save_dir} already holds a run: pass -resume to continue it, or choose another "
                        "-name")
    # The first epoch may be listed by a run killed before its last.pt; more mean last.pt was lost.
    listed = eers_before(os.path.join(save_dir, "eers.txt"), phases, len(phases), 0)
    if not os.path.exists(last_path) and len(listed) > 1:
        raise DataError(f"{last_path} not found, but {save_dir}/eers.txt lists {len(listed)} epochs: "
                        f"restore last.pt to continue, or choose another -name")


def main(args):
    """Check the flags, hold the run folder's lock, then train (``train``)."""
    common.keep_freed_memory()
    phases = make_phases(args)
    check_flags(args, phases)
    save_dir = os.path.join(args.save_dir, args.name)
    with runs.folder_lock(save_dir, "wait for it to end, or choose another -name"):
        check_resume(args, phases, save_dir)
        common.remove_temporaries(save_dir)  # of a killed run: never read, now removed
        return train(args, phases, save_dir)


def train(args, phases, save_dir):
    """Both phases (or the baseline) from the data to the embeddings pickle; returns the cosine EER."""
    if args.nb_thread > 0:
        torch.set_num_threads(args.nb_thread)
    baseline_eer = prepare_demo(args) if args.demo else None
    if args.reproducible:
        utils.seed_everything(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = load_data(args, save_dir)
    d_args = model_args(args, len(data.labels))
    start_phase, start_epoch, state = resume_point(args, phases, save_dir)
    write_run_files(args, phases, save_dir, d_args, start_phase, start_epoch)
    nb_val_utt = len(set(data.val_trials[1]) | set(data.val_trials[2]))
    print(f"{len(data.dev_keys)} training utterances of {len(data.labels)} speakers; "
          f"{len(data.val_trials[0])} validation trials over {nb_val_utt} utterances; "
          f"{len(data.eval_keys)} test utterances, {len(data.eval_trials[0])} trials; device {device}")
    for p in range(start_phase, len(phases)):
        first = p == start_phase
        run = build_phase(phases, p, args, d_args, device, save_dir, state if first else None)
        train_phase(phases, p, run, data, args, d_args, device, save_dir, start_epoch if first else 0)
    cosine_eer, pickle_path = write_embeddings(phases[-1], args, d_args, data, device, save_dir)
    if args.demo:
        demo_backend(args, save_dir, pickle_path, baseline_eer)
    return cosine_eer


def load_data(args, save_dir):
    """Every dev speaker trains; the validation trials (over -val_dir, written to val_trial.txt) and the
    test trials, each kept to the utterances its folder holds."""
    dev_lengths, dev_skipped = load_index(args.dev_dir)
    eval_lengths, eval_skipped = load_index(args.eval_dir)
    val_dir = args.val_dir or args.dev_dir
    val_lengths, val_skipped = (dev_lengths, dev_skipped) if val_dir == args.dev_dir else load_index(val_dir)
    data = argparse.Namespace(dev_keys=sorted(dev_lengths), eval_keys=sorted(eval_lengths), val_dir=val_dir)
    data.labels = utils.speaker_labels(data.dev_keys)
    data.eval_trials = usable_trials(scoring.read_trials(args.trials),
                                     {common.utt_id(k) for k in eval_lengths}, eval_skipped, args.trials)
    val_lines = validation_lines(args, sorted(val_lengths))
    data.val_trials = usable_trials(trial_arrays(val_lines), {common.utt_id(k) for k in val_lengths},
                                    val_skipped, args.val_trial or "the validation trials")
    common.write_lines(os.path.join(save_dir, "val_trial.txt"),
                [f"{t} {a}.wav {b}.wav" for t, a, b in zip(*data.val_trials)])
    return data


def resume_point(args, phases, save_dir):
    """Where this run starts: (phase index, epoch, last.pt's state or None). When last.pt ends a phase,
    the next one starts afresh with the random state the run would have had."""
    if not args.resume:
        return 0, 0, None
    state = load_checkpoint(os.path.join(save_dir, "last.pt"), "checkpoint to resume from", LAST_KEYS)
    start_phase, start_epoch = state["phase"], state["epoch"] + 1
    if start_epoch >= phases[start_phase].epochs:
        utils.set_rng_states(state["rng"])
        start_phase, start_epoch, state = start_phase + 1, 0, None
    print(f"resuming {save_dir} at " + (f"phase {start_phase + 1}, epoch {start_epoch}"
                                        if start_phase < len(phases) else "the embeddings pickle"))
    return start_phase, start_epoch, state


def write_run_files(args, phases, save_dir, d_args, start_phase, start_epoch):
    """f_params.txt (a new run only), eers.txt cut to the epochs before the start, args.json."""
    if not args.resume:
        params = [f"{k}:\t{v}" for k, v in sorted(vars(args).items())]
        params += [f"{k}:\t{v}" for k, v in sorted(d_args.items())]
        common.write_lines(os.path.join(save_dir, "f_params.txt"), params)
    eers_path = os.path.join(save_dir, "eers.txt")
    common.write_lines(eers_path, eers_before(eers_path, phases, start_phase, start_epoch))
    common.write_json_atomic({"args": vars(args), "d_args": d_args}, os.path.join(save_dir, "args.json"))


def build_phase(phases, p, args, d_args, device, save_dir, state):
    """Phase ``p``'s network, centers, optimiser, schedule and best EER: initialised (phase 2's strided
    conv and blocks from phase 1's best model), then, when ``state`` (last.pt) is given, loaded from it."""
    phase = phases[p]
    model = phase.model(d_args)
    model.apply(phase.init)
    center = CenterLoss(d_args["nb_classes"], args.m_nb_code, args.c_alpha) if phase.c_lambda else None
    if p > 0 and state is None:
        inherit(model, phases[p - 1].name, phase.name, save_dir, center is not None)
    model.to(device)
    if center is not None:
        center.to(device)
    optimizer = make_optimizer(model, args)
    scheduler = keras_decay_scheduler(optimizer, phase.lr_decay, phase.decay_offset)
    run = argparse.Namespace(model=model, center=center, optimizer=optimizer, scheduler=scheduler,
                             best_eer=math.inf)
    if state is not None:
        last_path = os.path.join(save_dir, "last.pt")
        runs.load_into(model, state["model"], last_path, "model")
        if center is not None:
            runs.load_into(center, state["center"], last_path, "center-loss state")
        runs.load_into(optimizer, state["optimizer"], last_path, "optimiser state")
        runs.load_into(scheduler, state["scheduler"], last_path, "learning-rate schedule")
        run.best_eer = state["best_eer"]
        utils.set_rng_states(state["rng"])
    nb_params = sum(t.numel() for t in model.parameters())
    print(f"phase {p + 1}/{len(phases)} ({phase.name}): {nb_params:,} parameters, {phase.epochs} epochs")
    return run


def inherit(model, source, name, save_dir, has_centers):
    """Copy the strided conv and blocks of phase ``source``'s best model into ``model`` (phase ``name``)."""
    path = os.path.join(save_dir, "models", f"{source}_best.pt")
    previous = load_checkpoint(path, f"best {source} model", BEST_KEYS)
    try:
        copied, kept = init_from_pretrained(model, previous["model"])
    except ValueError as e:
        raise DataError(f"{path}: {e}; use the model flags it was trained with") from None
    fresh = sorted({k.rsplit(".", 1)[0] for k in kept}) + (["centers"] if has_centers else [])
    print(f"{name}: {len(copied)} tensors copied from {source} (epoch {previous['epoch']}); initialised "
          f"afresh: {', '.join(fresh)}")


def train_phase(phases, p, run, data, args, d_args, device, save_dir, start_epoch):
    """Phase ``p``'s epochs from ``start_epoch``: train, score, save (``save_epoch``)."""
    phase = phases[p]
    train_set = CropSet(data.dev_keys, args.dev_dir, data.labels, args.nb_samp, seed=args.seed, phase=p)
    for epoch in range(start_epoch, phase.epochs):
        train_set.epoch = epoch
        generator = torch.Generator().manual_seed(args.seed + 1000 * p + epoch)
        sampler = RandomSampler(train_set, generator=generator)
        loader = DataLoader(train_set, batch_size=args.bs, sampler=sampler, drop_last=True,
                            num_workers=args.nb_worker, pin_memory=device.type == "cuda")
        losses = train_epoch(run.model, run.center, loader, run.optimizer, run.scheduler, args,
                             phase.c_lambda, device, f"{phase.name} epoch {epoch}")
        eval_eer = None
        if args.eval_every and (epoch + 1) % args.eval_every == 0:
            eval_eer, scores = evaluate(run.model, data.eval_trials, args.eval_dir, args, device, "Vox1-O")
            common.write_lines(os.path.join(save_dir, "results", f"{phase.name}_eval_epoch{epoch}.txt"),
                        [f"{s} {t}" for s, t in zip(scores, data.eval_trials[0])])
        crop = (args.nb_samp, (args.seed, 7, p, epoch)) if args.val_crop else None
        val_eer = evaluate(run.model, data.val_trials, data.val_dir, args, device, "validation", crop)[0]
        is_best = save_epoch(phases, p, epoch, run, val_eer, eval_eer, args, d_args, save_dir)
        terms = ", ".join(f"{k} {v:.3f}" for k, v in losses.items() if k != "loss")
        tqdm.write(f"{phase.name} epoch {epoch}: loss {losses['loss']:.3f} ({terms}), val EER "
                   f"{100 * val_eer:.2f} %"
                   + (f", Vox1-O EER {100 * eval_eer:.2f} %" if eval_eer is not None else "")
                   + (" (best)" if is_best else ""))


def save_epoch(phases, p, epoch, run, val_eer, eval_eer, args, d_args, save_dir):
    """The epoch's eers.txt line, the phase's best model if ``val_eer`` is a new best, then last.pt: until
    it is renamed into place, a resumed run redoes the epoch. Returns whether the model is a new best."""
    phase = phases[p]
    eers_path = os.path.join(save_dir, "eers.txt")
    line = (f"phase:{phase.name}, epoch:{epoch}, val_eer:{val_eer:.4f}"
            + (f", eval_eer:{eval_eer:.4f}" if eval_eer is not None else ""))
    common.write_lines(eers_path, eers_before(eers_path, phases, p, epoch) + [line])
    center = run.center.state_dict() if run.center else None
    is_best = val_eer < run.best_eer
    if is_best:
        run.best_eer = val_eer
        runs.save_atomic({"model": run.model.state_dict(), "center": center, "d_args": d_args,
                           "phase": phase.name, "epoch": epoch, "val_eer": val_eer, "eval_eer": eval_eer},
                          os.path.join(save_dir, "models", f"{phase.name}_best.pt"))
    runs.save_atomic({"model": run.model.state_dict(), "center": center,
                       "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                       "phase": p, "epoch": epoch,
                       "best_eer": run.best_eer, "rng": utils.rng_states(), "args": vars(args),
                       "d_args": d_args}, os.path.join(save_dir, "last.pt"))
    return is_best


def write_embeddings(phase, args, d_args, data, device, save_dir):
    """Embeddings of every dev and test utterance by ``phase``'s best model, pickled; returns the Vox1-O
    cosine EER and the pickle's path."""
    best_path = os.path.join(save_dir, "models", f"{phase.name}_best.pt")
    best = load_checkpoint(best_path, f"best {phase.name} model", BEST_KEYS)
    model = phase.model(d_args)
    runs.load_into(model, best["model"], best_path, "model")
    model.to(device)
    pickle_path = os.path.join(save_dir, "embeddings.pk")
    dev = embed_utterances(model, data.dev_keys, args.dev_dir, device, min(args.nb_worker, 4), args.progress,
                           "dev embeddings")
    test = embed_utterances(model, data.eval_keys, args.eval_dir, device, min(args.nb_worker, 4),
                            args.progress, "test embeddings")
    common.write_pickle_atomic({"dev_dic_embeddings": dev, "eval_dic_embeddings": test}, pickle_path)
    labels, keys_a, keys_b = data.eval_trials
    cosine_eer = scoring.compute_eer(labels, scoring.cosine_scores(test, keys_a, keys_b))[0]
    print(f"best {phase.name} model (epoch {best['epoch']}): Vox1-O cosine EER {100 * cosine_eer:.2f} %; "
          f"embeddings in {pickle_path}")
    return cosine_eer, pickle_path


def demo_backend(args, save_dir, pickle_path, baseline_eer):
    """-demo: the b-vector back-end on the run's embeddings, and the summary line."""
    import train_bvec
    bvec = train_bvec.main(train_bvec.parse_args(
        ["-embeddings", pickle_path, "-trials", args.trials, "-out_dir", os.path.join(save_dir, "bvec"),
         "-val_trial", os.path.join(save_dir, "val_trial.txt"), "-seed", str(args.seed),
         "-progress", str(args.progress)] + DEMO_BVEC_FLAGS))
    print(f"demo: naive baseline EER {100 * baseline_eer:.2f} %, RawNet cosine EER "
          f"{100 * bvec['cosine']:.2f} %, b-vector EER {100 * bvec['bvec']:.2f} %")


def prepare_demo(args):
    """Synthesise the demo corpus (cached) and pre-process its two sets (resumable); returns the naive
    baseline EER of the corpus."""
    import demo_corpus
    import pre_process_waveforms
    demo_corpus.make_demo_corpus(DEMO_ROOT)
    for wav_dir, out_dir in ((f"{DEMO_ROOT}/VoxCeleb2/wav/", args.dev_dir),
                             (f"{DEMO_ROOT}/VoxCeleb1/eval_wav/", args.eval_dir)):
        pre_process_waveforms.main(pre_process_waveforms.parse_args(
            ["-wav_dir", wav_dir, "-out_dir", out_dir]), progress=args.progress)
    baseline_eer = demo_corpus.naive_baseline_eer(DEMO_ROOT)
    print(f"demo corpus: {DEMO_ROOT}; naive baseline (cosine of mean log-spectra) EER "
          f"{100 * baseline_eer:.2f} %")
    return baseline_eer


if __name__ == "__main__":
    common.run_cli(lambda: main(parse_args()),
                   interrupted="interrupted: the last completed epoch is in last.pt; continue with -resume")
