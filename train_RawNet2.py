"""Train RawNet2 on VoxCeleb2 and evaluate on VoxCeleb1 (Vox1-O) after every epoch.

    python train_RawNet2.py -name NAME            # the paper's recipe on DB/VoxCeleb2 + DB/VoxCeleb1
    python train_RawNet2.py -name demo -demo      # the whole pipeline on a synthetic corpus, CPU, minutes

Reproduces the training script of github.com/Jungjee/RawNet (python/RawNet2): same flags (single
dash; a double dash works too), same defaults, same outputs under ``<save_dir>/<name>/``:
``f_params.txt``, ``eers.txt`` (``epoch:E, TA_eval_eer:X``), ``results/eval_epoch{E}.txt`` (``score
target`` per trial), and on a new best EER ``models/TA_{E}_{eer:.4f}.pt`` (state_dict) and
``models/best_opt_eval.pt`` (optimiser).

Added: ``last.pt`` and ``args.json`` every epoch (``-resume``), ``-val_trial``, ``-demo``, ``-fast``,
``-amp``, torchrun/DDP and a run-folder lock. docs/FIDELITY.md lists what is kept from the original
script, its quirks, and each deliberate difference with its reason.
"""

import argparse
import contextlib
import dataclasses
import datetime
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import common
import distributed
import fast_RawNet2
import runs
import scoring
import tta
import utils
from common import DataError, TrainingError
from model_RawNet2 import RawNet2, min_nb_samp, strip_module_prefix

# Scaled-down configuration of -demo: shorter crops, fewer filters, a smaller GRU; every other part of
# the pipeline is the paper's. Explicit flags on the command line still win.
DEMO_DEFAULTS = {
    "DB": "DB/demo/VoxCeleb1/", "DB_vox2": "DB/demo/VoxCeleb2/",
    "nb_samp": 16000, "m_nb_samp": 16000, "window_size": 3200,
    "m_filts": [32, [32, 32], [32, 64], [64, 64]], "m_gru_node": 128, "m_nb_fc_node": 128,
    "bs": 32, "lr": 0.001, "epoch": 10, "nb_worker": 2,
}


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train RawNet2 (Interspeech 2020) on VoxCeleb2; TTA EER on VoxCeleb1 each epoch.")

    flag = common.BOOL_FLAG
    add = common.arg_group(parser, "run")
    add("name", **common.RUN_NAME_FLAG)
    add("save_dir", **common.SAVE_DIR_FLAG)
    add("demo", action="store_true",
        help="synthesise the built-in demo corpus under DB/demo/ (once) and train a scaled-down "
             "RawNet2 on it; explicit flags still override the demo's defaults")
    add("seed", type=int, default=1234, help="seed for initialisation, shuffling and crops")
    # (DataLoader processes: another meaning and default than the extraction's reading threads)
    add("nb_worker", type=int, default=8, help="DataLoader worker processes reading training audio; the "
                                               "evaluation reads ahead in min(this, 4, cores) threads")
    add("mg", default=True, help="nn.DataParallel over all visible GPUs when more than one is visible "
                                 "(single process; under torchrun DistributedDataParallel is used instead)",
        **flag)
    add("dist_timeout", type=int, default=1800,
        help="seconds a torchrun process waits for the others (joining, collectives) before it fails; "
             "with torchrun --max-restarts the group then restarts from last.pt")
    add("sync_bn", default=False,
        help="synchronise batch-norm statistics across processes (torchrun on GPUs)", **flag)
    add("fast", **common.FAST_FLAG)
    add("amp", type=str, default="none", choices=["none", "bf16", "fp16"],
        help="mixed precision of the training steps: bf16 autocast, or fp16 autocast with a gradient "
             "scaler (GPU only); the sinc front end and the per-epoch TTA evaluation stay float32, and "
             "on a GPU under bf16 the GRU too (autocast alone would run cuDNN's GRU in float16)")
    add("reproducible", default=True,
        help="seed torch/numpy/random and make cuDNN deterministic (-cudnn_benchmark stays off unless "
             "given)", **flag)
    add("cudnn_benchmark", default=False,
        help="cuDNN times its algorithms on the first batches and keeps the fastest "
             "(torch.backends.cudnn.benchmark): faster on a GPU, but its picks can differ from run to "
             "run, and so can the last digits of every result (also under -reproducible)", **flag)
    add("compile", default=False,
        help="torch.compile the network for the training steps; it then runs the network of "
             "model_RawNet2.py (as -fast False; on a GPU the rule picks the same), the per-epoch "
             "evaluation runs it uncompiled, and checkpoints keep their keys. Not with DataParallel "
             "(use torchrun or -mg False)", **flag)
    add("resume", **common.RESUME_FLAG)
    add("load_model", default=False, help="start from -load_model_dir (and -load_model_opt_dir)", **flag)
    add("load_model_dir", type=str, default="", help="state_dict to start from with -load_model")
    add("load_model_opt_dir", type=str, default="", help="optimiser state to start from with -load_model")

    add = common.arg_group(parser, "data")
    add("DB", type=str, default="DB/VoxCeleb1/", help="VoxCeleb1 folder: eval_wav/, veri_test.txt, ...")
    add("DB_vox2", type=str, default="DB/VoxCeleb2/", help="VoxCeleb2 folder holding -dev_wav")
    add("dev_wav", type=str, default="wav/", help="training wavs, inside -DB_vox2")
    add("val_wav", type=str, default="dev_wav/",
        help="validation wavs, inside -DB (only with -make_val_trial/-val_trial)")
    add("eval_wav", **common.EVAL_WAV_FLAG)
    add("nb_samp", type=int, default=59049, help="samples per training crop and TTA segment")
    add("wav_index", default=True,
        help="read only each crop's frames, scaled by the file's peak from an index built once "
             "(<dev_wav>_index.npz beside the folder); the crops equal the original's full reads", **flag)
    # (a value of its own: what a run records in last.pt, where the other scripts' default comes from)
    add("window_size", type=int, default=utils.DEFAULT_WINDOW_SIZE,
        help="overlap in samples between consecutive TTA segments")
    add("make_val_trial", default=False,
        help="write -nb_val_trial random trials over -val_wav to <DB>/val_trial.txt, then go on", **flag)
    add("nb_val_trial", type=int, default=40000, help="number of trials written by -make_val_trial")
    add("val_trial", type=str, default="",
        help="select the best model on this trial list (keys in <DB>/<val_wav>) instead of veri_test.txt")

    add = common.arg_group(parser, "optimisation")
    add("bs", type=int, default=100,
        help="global batch size (split over GPUs by DataParallel, or over torchrun processes)")
    add("lr", type=float, default=0.001, help="initial learning rate")
    add("wd", type=float, default=0.0001, help="weight decay (0 for parameters whose name has 'bn')")
    add("epoch", type=int, default=80, help="number of epochs")
    add("optimizer", type=str, default="Adam", choices=["Adam", "SGD"],
        help="Adam (paper), or SGD with momentum 0.9")
    add("amsgrad", **common.AMSGRAD_FLAG)
    add("do_lr_decay", default=True, help="decay the learning rate with -lr_decay", **flag)
    add("lr_decay", type=str, default="keras", choices=["keras"],
        help="keras: lr * 1 / (1 + 1e-4 * step), stepped after every optimiser step")

    add = common.arg_group(parser, "model")
    add("m_first_conv", type=int, default=251, help="sinc filter length (taps)")
    add("m_in_channels", type=int, default=1, help="input channels")
    add("m_filts", type=common.literal_list, default=[128, [128, 128], [128, 256], [256, 256]],
        help="filters: [sinc, [block0-1 in, out], [block2 in, out], [block3-5 in, out]]")
    add("m_nb_fc_node", type=int, default=1024, help="embedding size (fc1_gru)")
    add("m_gru_node", type=int, default=1024, help="GRU hidden units")
    add("m_nb_gru_layer", type=int, default=1, help="GRU layers")
    add("m_nb_samp", type=int, default=59049, help="model input length; must equal -nb_samp")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if "-demo" in argv or "--demo" in argv:
        parser.set_defaults(**DEMO_DEFAULTS)
    return parser.parse_args(argv)


def model_args(args, nb_classes):
    return {"first_conv": args.m_first_conv, "in_channels": args.m_in_channels,
            "filts": args.m_filts, "nb_fc_node": args.m_nb_fc_node, "gru_node": args.m_gru_node,
            "nb_gru_layer": args.m_nb_gru_layer, "nb_samp": args.m_nb_samp, "nb_classes": nb_classes}


# ---------------------------------------------------------------------------------------------

# Training steps between two reads of their losses from the device. A read waits for the device to
# finish the step: read every step (between forward and backward), it would keep a GPU waiting for its
# next batch. The losses are checked and summed in step order whenever they are read: the same numbers.
LOSS_READ_EVERY = 16


def train_epoch(model, loader, optimizer, scheduler, device, epoch, step, amp="none", scaler=None,
                progress=True):
    """One pass over the training list. Returns (mean loss, global step)."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    total, count, unread = 0.0, 0, []
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not progress, leave=False, dynamic_ncols=True)
    for x, y, keys in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with utils.amp_autocast(device, amp):
            loss = criterion(model(x), y)
        utils.backward_step(loss, optimizer, scaler)
        if scheduler is not None:
            scheduler.step()
        unread.append((step, loss.detach(), keys))
        step += 1
        if len(unread) == LOSS_READ_EVERY:
            total, count = read_losses(unread, total, count, epoch)
            bar.set_postfix(loss=f"{total / count:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    total, count = read_losses(unread, total, count, epoch)
    return total / max(count, 1), step


def read_losses(unread, total, count, epoch):
    """Add the losses of ``unread`` (step, loss tensor, batch keys) to (total, count), in step order,
    and empty it; a non-finite loss stops training, naming its step and batch."""
    values = torch.stack([loss for _, loss, _ in unread]).tolist() if unread else []
    for (step, _, keys), value in zip(unread, values):
        if not math.isfinite(value):
            raise TrainingError(f"non-finite loss {value} at step {step} (epoch {epoch}); "
                                f"batch utterances: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
        total, count = total + value, count + 1
    unread.clear()
    return total, count


def evaluate(model, keys, base_dir, trials, args, device, desc):
    """TTA embeddings of ``keys`` (sharded over ranks when distributed), cosine score per trial, EER.
    Trials touching a silent file are dropped with a warning. Returns (eer, scores, labels)."""
    rank, world = distributed.rank_and_world()
    net = utils.unwrap_model(model)
    distributed.broadcast_buffers(net)  # DDP keeps batch-norm statistics per process: use rank 0's
    embeddings, skipped = tta.embed_utterances(
        net, keys[rank::world], base_dir, args.nb_samp, args.window_size, device=device,
        nb_worker=min(args.nb_worker, 4), desc=desc, progress=rank == 0)
    embeddings, skipped = distributed.all_gather_embeddings(embeddings, skipped)
    (labels, keys_a, keys_b), dropped = scoring.trials_without(trials, skipped)
    if skipped and rank == 0:
        tqdm.write(f"warning: {len(skipped)} silent/empty files skipped ({', '.join(skipped[:5])}); "
                   f"{dropped} trials dropped")
    scores = scoring.cosine_scores(embeddings, keys_a, keys_b)
    eer, _ = scoring.compute_eer(labels, scores)
    return eer, scores, labels


def load_trials(path, keys):
    trials = scoring.read_trials(path)
    scoring.check_keys(trials[1] + trials[2], {common.utt_id(k) for k in keys}, f"trial keys of {path}")
    return trials


def eers_before(path, epoch):
    """Lines of an eers.txt for epochs before ``epoch`` (a resumed or restarted run drops the lines of
    epochs that its last.pt does not cover, so no epoch is listed twice)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().splitlines()
    return [line for line in lines if re.match(r"epoch:(\d+),", line) and int(line.split(",")[0][6:]) < epoch]


# ---------------------------------------------------------------------------------------------
# The steps of main: check the flags, set up, resume, one epoch, save

MAX_NB_SAMP = 600 * utils.SAMPLE_RATE  # ten minutes of audio per crop is a typo, not a setting


def check_filts(filts):
    """-m_filts must be [sinc, [in, out], [in, out], [in, out]] of positive integers whose channels chain."""
    pairs_ok = all(isinstance(f, list) and len(f) == 2 and all(isinstance(c, int) for c in f)
                   for f in filts[1:])
    shape_ok = isinstance(filts, list) and len(filts) == 4 and isinstance(filts[0], int) and pairs_ok
    if not shape_ok or filts[0] < 1 or min(c for f in filts[1:] for c in f) < 1:
        return "must be [sinc, [in, out], [in, out], [in, out]] of positive integers"
    if filts[1] != [filts[0], filts[0]] or filts[2][0] != filts[1][1]:
        return "channels must chain: blocks 0-1 take and give filts[0] channels, block 2 takes them"
    return None


def validate_args(args):
    """One line naming the flag for any value a run cannot use; called before anything is written."""
    def bad(flag, why):
        raise DataError(f"-{flag} {getattr(args, flag)}: {why}")

    for flag in ("nb_samp", "m_nb_samp", "bs", "epoch", "m_first_conv", "m_nb_fc_node", "m_gru_node",
                 "m_nb_gru_layer", "dist_timeout"):
        if getattr(args, flag) < 1:
            bad(flag, "must be at least 1")
    for flag in ("nb_worker", "window_size"):
        if getattr(args, flag) < 0:
            bad(flag, "must not be negative")
    if not (math.isfinite(args.lr) and args.lr > 0):
        bad("lr", "must be a positive number")
    if not 0 <= args.seed < 2 ** 32:
        bad("seed", "must be from 0 to 2**32 - 1 (what numpy's generator takes)")
    if not (math.isfinite(args.wd) and args.wd >= 0):
        bad("wd", "must be a number >= 0")
    if args.m_in_channels != 1:
        bad("m_in_channels", "the sinc front end takes one channel")
    if args.make_val_trial and args.nb_val_trial < 2:
        bad("nb_val_trial", "must be at least 2 (one target, one non-target trial)")
    why = check_filts(args.m_filts)
    if why:
        raise DataError(f"-m_filts {args.m_filts}: {why}")
    if not min_nb_samp(args.m_first_conv) <= args.nb_samp <= MAX_NB_SAMP:
        bad("nb_samp", f"must be from {min_nb_samp(args.m_first_conv)} (the network's shortest input with "
                       f"-m_first_conv {args.m_first_conv}) to {MAX_NB_SAMP} (ten minutes)")
    if args.m_nb_samp != args.nb_samp:
        raise DataError(f"-m_nb_samp ({args.m_nb_samp}) must equal -nb_samp ({args.nb_samp})")
    if args.nb_samp <= args.window_size:
        raise DataError(f"-window_size ({args.window_size}) must be smaller than -nb_samp ({args.nb_samp})")
    if args.amp == "fp16" and not torch.cuda.is_available():
        raise DataError("-amp fp16 needs a GPU (its gradient scaler is CUDA-only); use -amp bf16 on CPU")
    if args.load_model and not args.load_model_dir:
        raise DataError("-load_model needs -load_model_dir (the state_dict to start from)")
    for flag in ("save_dir", "DB", "DB_vox2"):
        if os.path.exists(getattr(args, flag)) and not os.path.isdir(getattr(args, flag)):
            bad(flag, "is a file, not a folder")
    name = args.name
    if not name.strip() or name in (".", "..") or any(c in name for c in ("/", os.sep, "\0")):
        bad("name", "must be a plain folder name (not empty, no '/', not '.' or '..')")
    run_dir = os.path.join(args.save_dir, name)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        bad("name", f"{run_dir} must be a folder name")


# Flags whose values -resume restores from last.pt (the optimiser's parameter groups, the schedule):
# another value on the command line would be recorded in args.json but not used.
RESTORED_FLAGS = ("optimizer", "lr", "wd", "amsgrad", "do_lr_decay", "lr_decay")


def check_restored_flags(args, last_path):
    """One line naming the first of RESTORED_FLAGS whose value differs from the run's own (last.pt's
    recorded flags; its tensors are left on disk)."""
    state = runs.load_torch_file(last_path, "checkpoint to resume from", mmap=True)
    recorded = state.get("args") if isinstance(state, dict) else None
    for flag in RESTORED_FLAGS if isinstance(recorded, dict) else ():
        old, new = recorded.get(flag, getattr(args, flag)), getattr(args, flag)
        if old != new:
            raise DataError(f"-{flag} {new}: this run was trained with -{flag} {old}, which -resume "
                            f"restores from {last_path}: resume with -{flag} {old}, or start another -name")


def decide_resume(args, run_dir):
    """Whether this run continues ``run_dir`` from its last.pt. A group restarted by torchrun
    --max-restarts, or a Slurm job requeued, continues by itself; a finished or started run is never
    silently started over."""
    last_path = os.path.join(run_dir, "last.pt")
    restarted = any(int(os.environ.get(v, "0")) > 0
                    for v in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))
    if os.path.exists(last_path):
        if not (args.resume or restarted):
            raise DataError(f"{run_dir} already holds a run: pass -resume to continue it, "
                            f"or choose another -name")
        check_restored_flags(args, last_path)
        return True
    listed = [int(line.split(",")[0][6:])
              for line in eers_before(os.path.join(run_dir, "eers.txt"), math.inf)]
    if max(listed, default=0) > 0:  # epoch 0 may be listed by a run killed before committing it
        raise DataError(f"{last_path} not found, but {run_dir}/eers.txt lists epochs up to {max(listed)}: "
                        f"restore last.pt to continue, or choose another -name")
    if args.resume:
        # what a start leaves, from the first folders on: a folder holding none of it (its lock
        # aside) is no run, e.g. a mistyped -name
        if not any(os.path.exists(os.path.join(run_dir, f))
                   for f in ("args.json", "f_params.txt", "models", "results")):
            raise DataError(f"-resume: {last_path} not found (no completed epoch to continue from)")
        if distributed.is_main_process():
            print(f"note: {run_dir} has no completed epoch (no last.pt) to continue: starting at epoch 0")
    return False


def load_data(args, main_process):
    """Training keys and labels; test keys and trials; validation keys and trials with -val_trial."""
    data = argparse.Namespace(train_dir=os.path.join(args.DB_vox2, args.dev_wav),
                              eval_dir=os.path.join(args.DB, args.eval_wav),
                              val_dir=os.path.join(args.DB, args.val_wav), val_keys=None, val_trials=None)
    data.train_keys = utils.list_utterances(data.train_dir)
    if len(data.train_keys) < args.bs:
        raise DataError(f"-bs {args.bs}: larger than the {len(data.train_keys)} training utterances of "
                        f"{data.train_dir} (incomplete batches are dropped)")
    data.labels = utils.speaker_labels(data.train_keys)
    data.eval_keys = utils.list_utterances(data.eval_dir)
    data.eval_trials = load_trials(os.path.join(args.DB, "veri_test.txt"), data.eval_keys)
    if args.make_val_trial and main_process:
        rng = np.random.default_rng(args.seed)
        lines = utils.make_validation_trials(utils.list_utterances(data.val_dir), args.nb_val_trial, rng)
        common.write_lines(os.path.join(args.DB, "val_trial.txt"), lines)
    distributed.barrier()
    if args.val_trial:
        data.val_keys = utils.list_utterances(data.val_dir)
        data.val_trials = load_trials(args.val_trial, data.val_keys)
    return data


CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "scaler", "epoch", "step", "best_eer", "rng",
                   "args", "d_args", "world_size"}


@dataclasses.dataclass
class TrainState:
    """Everything a run continues from: the network (unwrapped, on its device), its optimiser, the
    learning-rate schedule, fp16's gradient scaler, and progress. ``save``/``load`` are last.pt."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object = None
    scaler: object = None
    epoch: int = -1  # last completed epoch
    step: int = 0
    best_eer: float = math.inf

    def save(self, path, args, d_args, world):
        """last.pt, atomically; every value loads with ``torch.load(weights_only=True)``."""
        runs.save_atomic({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                           "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                           "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                           "epoch": self.epoch, "step": self.step, "best_eer": self.best_eer,
                           "rng": utils.rng_states(), "args": vars(args), "d_args": d_args,
                           "world_size": world}, path)

    def load(self, path):
        """Continue from ``path`` (a last.pt of ``save``), RNG states included. The optimiser's
        state lands on its parameters' device (``Optimizer.load_state_dict`` casts it there)."""
        state = runs.load_torch_file(path, "checkpoint to resume from")
        missing = sorted(CHECKPOINT_KEYS - set(state if isinstance(state, dict) else ()))
        if missing:
            raise DataError(f"{path}: not a last.pt of train_RawNet2.py (it lacks {', '.join(missing)})")
        runs.load_into(self.model, state["model"], path, "model")
        runs.load_into(self.optimizer, state["optimizer"], path, "optimiser state")
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.best_eer = state["epoch"], state["step"], state["best_eer"]
        utils.set_rng_states(state["rng"])


def build_training(args, d_args, device):
    """Network (original initialisation, or -load_model), moved to ``device`` before the optimiser
    is built and -load_model_opt_dir loaded, so that the optimiser's state sits beside its parameters."""
    model = fast_RawNet2.accelerate(RawNet2(d_args), args.fast)
    if args.load_model:
        weights = runs.load_torch_file(args.load_model_dir, "-load_model_dir state_dict")
        runs.load_into(model, strip_module_prefix(weights), args.load_model_dir, "state_dict")
    else:
        model.apply(utils.init_weights)
    model.to(device)
    groups = utils.param_groups(model, args.wd)
    if args.optimizer == "Adam":
        optimizer = utils.adam(groups, lr=args.lr, weight_decay=args.wd, amsgrad=args.amsgrad)
    else:
        optimizer = torch.optim.SGD(groups, lr=args.lr, weight_decay=args.wd, momentum=0.9)
    if args.load_model and args.load_model_opt_dir:
        opt_state = runs.load_torch_file(args.load_model_opt_dir, "-load_model_opt_dir optimiser state")
        runs.load_into(optimizer, opt_state, args.load_model_opt_dir, "optimiser state")
    scheduler = (torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=utils.keras_lr_decay)
                 if args.do_lr_decay else None)
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" else None
    return TrainState(model, optimizer, scheduler, scaler)


def write_run_files(args, run_dir, d_args, nb_params, resume, start_epoch, world, fast_path):
    """Folders, f_params.txt (a new run only), eers.txt cut to the epochs last.pt covers, args.json."""
    for sub in ("models", "results"):
        try:
            os.makedirs(os.path.join(run_dir, sub), exist_ok=True)
        except OSError as e:
            raise common.output_error(os.path.join(run_dir, sub), e, "nothing was written") from None
    if not resume:
        params = [f"{k}:\t{v}" for k, v in sorted(vars(args).items())]
        params += [f"{k}:\t{v}" for k, v in sorted(d_args.items())] + [f"nb_params:\t{nb_params}"]
        common.write_lines(os.path.join(run_dir, "f_params.txt"), params)
    eers_path = os.path.join(run_dir, "eers.txt")
    common.write_lines(eers_path, eers_before(eers_path, start_epoch))
    common.write_json_atomic({"args": vars(args), "d_args": d_args, "nb_params": nb_params,
                             "world_size": world, "fast_path": fast_path}, os.path.join(run_dir, "args.json"))


def fast_path_plans(model, args, device, world):
    """What the fast path runs in this run's training steps and per-epoch TTA evaluation (a fixed
    rule: see fast_RawNet2.RULES), each said in one line; None with -fast False."""
    if not isinstance(model, fast_RawNet2.FastRawNet2):
        return None
    replicas = torch.cuda.device_count() if args.mg and world == 1 and device.type == "cuda" else 1
    batch = -(-args.bs // world // max(1, replicas))  # (DataParallel's first, largest chunk)
    train = fast_RawNet2.call_of(model, batch, device, True, utils.AMP_DTYPES.get(args.amp))
    segments = fast_RawNet2.segments_per_forward(model, device)
    evaluation = fast_RawNet2.call_of(model, segments, device, False)
    return {"training": fast_RawNet2.announce(fast_RawNet2.plan(train, model.fast_overrides)),
            "evaluation": fast_RawNet2.announce(fast_RawNet2.plan(evaluation, model.fast_overrides)),
            "segments_per_forward": segments}


def setup_device(args):
    """The device of this process. Under torchrun (WORLD_SIZE > 1) join the process group: NCCL and
    one GPU per process, or gloo on CPU."""
    rank, world = distributed.rank_and_world()
    if args.bs % world:
        raise DataError(f"-bs {args.bs} is not divisible by the world size {world} "
                        f"(the global batch is split evenly over processes)")
    if args.sync_bn and (world == 1 or not torch.cuda.is_available()):
        raise DataError("-sync_bn needs a distributed run on GPUs (torchrun --nproc_per_node=N)")
    if world == 1:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        local_rank, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local_rank >= gpus:
            raise DataError(f"local process {local_rank} has no GPU of its own: {gpus} visible on this node; "
                            f"start at most {gpus} per node (torchrun --nproc_per_node={gpus}), or hide the "
                            f"GPUs (CUDA_VISIBLE_DEVICES=) to train on CPU with gloo")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=args.dist_timeout)
        # After a torchrun restart the new processes share the launcher's key-value store with the
        # attempt before them; under a prefix of their own they cannot read a dead process's
        # address (gloo then failed to connect, or hung).
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"attempt{attempt}", store),
                                rank=rank, world_size=world, timeout=timeout)
    return device


class DataParallel(nn.DataParallel):
    """nn.DataParallel whose replicas run under the caller's autocast dtype. PyTorch runs each
    replica in a thread of its own and re-enters autocast there with the on/off state only; the
    dtype is per thread, so -amp bf16 would run every replica in float16."""

    def parallel_apply(self, replicas, inputs, kwargs):
        device_type = self.src_device_obj.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            replicas = [utils.under_autocast(r, device_type, dtype) for r in replicas]
        return super().parallel_apply(replicas, inputs, kwargs)


def wrap_model(model, args, device):
    """DistributedDataParallel under torchrun; else nn.DataParallel with -mg on several GPUs. With
    -compile, the network is compiled in place first (``nn.Module.compile``: the module keeps its
    parameters and state-dict keys; only calling it runs the compiled code, ``embed`` stays eager)."""
    _, world = distributed.rank_and_world()
    data_parallel = world == 1 and args.mg and torch.cuda.device_count() > 1
    if args.compile:
        if data_parallel:  # its replicas are copies of the module that would run uncompiled
            raise DataError("-compile does not work with DataParallel: use torchrun, or -mg False")
        fast_RawNet2.accelerate(model, False)  # the fast path's CPU kernels are not traceable
    if world > 1 and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.compile:
        model.compile()
    if world > 1:
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return DataParallel(model) if data_parallel else model


def make_loader(args, data, device):
    """Shuffling and crops depend only on (seed, epoch): a resumed run sees the same data. Each process
    takes its own disjoint share of every epoch (DistributedSampler; one share when not distributed)."""
    rank, world = distributed.rank_and_world()
    index = None
    if args.wav_index:  # every process; the first builds (or completes) it, the others wait on a file
        # lock, in no collective: a long build on slow storage cannot time the group out
        index = utils.wav_index(data.train_keys, data.train_dir, nb_worker=max(1, args.nb_worker))
    train_set = utils.TrainSet(data.train_keys, data.train_dir, data.labels, args.nb_samp, seed=args.seed,
                               index=index)
    sampler = utils.EpochSampler(
        DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed))
    loader = DataLoader(train_set, batch_size=args.bs // world, sampler=sampler, drop_last=True,
                        num_workers=args.nb_worker, persistent_workers=args.nb_worker > 0,
                        pin_memory=device.type == "cuda")
    return loader, sampler


def run_epoch(model, state, loader, data, args, device, epoch):
    """Train one epoch, then the TTA evaluation. Returns (loss, eer, selection EER, scores, labels)."""
    loss, state.step = train_epoch(model, loader, state.optimizer, state.scheduler, device, epoch, state.step,
                                   args.amp, state.scaler, progress=distributed.is_main_process())
    eer, scores, trial_labels = evaluate(model, data.eval_keys, data.eval_dir, data.eval_trials, args, device,
                                         "TTA eval")
    selection_eer = eer
    if args.val_trial:
        selection_eer, _, _ = evaluate(model, data.val_keys, data.val_dir, data.val_trials, args, device,
                                       "TTA val")
    return loss, eer, selection_eer, scores, trial_labels


def save_epoch(run_dir, state, line, scores, trial_labels, is_best, args, d_args, world):
    """The epoch's outputs, last.pt last: until it is renamed into place, a resumed run redoes the epoch
    and writes the same files again."""
    epoch = state.epoch
    common.write_lines(os.path.join(run_dir, "results", f"eval_epoch{epoch}.txt"),
                [f"{s} {t}" for s, t in zip(scores, trial_labels)])
    eers_path = os.path.join(run_dir, "eers.txt")
    common.write_lines(eers_path, eers_before(eers_path, epoch) + [line])
    if is_best:
        runs.save_atomic(state.model.state_dict(),
                          os.path.join(run_dir, "models", f"TA_{epoch}_{state.best_eer:.4f}.pt"))
        runs.save_atomic(state.optimizer.state_dict(), os.path.join(run_dir, "models", "best_opt_eval.pt"))
    state.save(os.path.join(run_dir, "last.pt"), args, d_args, world)


def main(args):
    validate_args(args)
    common.keep_freed_memory()
    main_process = distributed.is_main_process()
    run_dir = os.path.join(args.save_dir, args.name)
    device = setup_device(args)
    # Only rank 0 writes, so only rank 0 holds the run folder's lock.
    lock = (runs.folder_lock(run_dir, "wait for it to end, or choose another -name") if main_process
            else contextlib.nullcontext())
    with lock:
        resume = decide_resume(args, run_dir)  # every process: all of them stop alike, or none
        if main_process:
            common.remove_temporaries(run_dir)  # of a killed process: never read, now removed
        return train(args, run_dir, device, resume)


def train(args, run_dir, device, resume):
    """Set up, resume, then per epoch: train, evaluate, save. Returns the best selection EER."""
    rank, world = distributed.rank_and_world()
    main_process = rank == 0
    log = print if main_process else (lambda *a, **k: None)
    baseline_eer = None
    if args.demo:
        import demo_corpus
        root = os.path.dirname(os.path.normpath(args.DB))
        if main_process:
            demo_corpus.make_demo_corpus(root)
            baseline_eer = demo_corpus.naive_baseline_eer(root)
            log(f"demo corpus: {root}; naive baseline (cosine of mean log-spectra) "
                f"EER {100 * baseline_eer:.2f} %")
        distributed.barrier()
    if args.reproducible:
        utils.seed_everything(args.seed)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark

    data = load_data(args, main_process)
    d_args = model_args(args, len(data.labels))
    state = build_training(args, d_args, device)
    if resume:
        state.load(os.path.join(run_dir, "last.pt"))
        log(f"resuming {run_dir} after epoch {state.epoch} (best EER {100 * state.best_eer:.2f} %)")
    model = wrap_model(state.model, args, device)
    nb_params = sum(p.numel() for p in state.model.parameters())
    fast_path = fast_path_plans(state.model, args, device, world)
    if main_process:
        write_run_files(args, run_dir, d_args, nb_params, resume, state.epoch + 1, world, fast_path)
    parallel = {DistributedDataParallel: f", {world} processes (DistributedDataParallel)",
                DataParallel: f" x{torch.cuda.device_count()} (DataParallel)"}.get(type(model), "")
    log(f"{len(data.train_keys)} training utterances, {len(data.labels)} speakers; "
        f"{len(data.eval_keys)} test utterances, {len(data.eval_trials[0])} trials; "
        f"{nb_params:,} parameters; "
        f"device {device}{parallel}")

    loader, sampler = make_loader(args, data, device)
    for epoch in range(state.epoch + 1, args.epoch):
        sampler.set_epoch(epoch)
        loss, eer, selection_eer, scores, trial_labels = run_epoch(model, state, loader, data, args, device,
                                                                   epoch)
        line = f"epoch:{epoch}, TA_eval_eer:{eer:.4f}"
        if args.val_trial:
            line += f", TA_val_eer:{selection_eer:.4f}"
        is_best = selection_eer < state.best_eer
        state.epoch, state.best_eer = epoch, min(state.best_eer, selection_eer)
        if main_process:
            save_epoch(run_dir, state, line, scores, trial_labels, is_best, args, d_args, world)
            tqdm.write(f"epoch {epoch}: loss {loss:.3f}, TTA eval EER {100 * eer:.2f} %"
                       + (f", val EER {100 * selection_eer:.2f} %" if args.val_trial else "")
                       + (" (best)" if is_best else ""))
        distributed.barrier()  # every process starts the next epoch only once last.pt is complete

    if baseline_eer is not None:
        log(f"demo: naive baseline EER {100 * baseline_eer:.2f} %, "
            f"RawNet2 best TTA EER {100 * state.best_eer:.2f} %")
    if dist.is_initialized():
        dist.destroy_process_group()
    return state.best_eer


# Under torchrun, how long a rank other than 0 waits before it reports an error itself.
ERROR_GRACE_SECONDS = 5.0


def fail(line):
    """Exit 1 with ``line`` on stderr, said once under torchrun. Every process usually fails alike,
    and torchrun stops all of them as soon as one exits: so rank 0 says it at once, and the others
    wait ERROR_GRACE_SECONDS first (stopped during the wait once rank 0 has exited). An error of
    another rank alone is still said, after the wait."""
    if distributed.rank_and_world()[0] != 0:
        time.sleep(ERROR_GRACE_SECONDS)
    print(line, file=sys.stderr)
    sys.exit(1)


def cli(argv=None):
    """Command-line entry: bad input ends in one line on stderr (once under torchrun), exit 1."""
    common.run_cli(lambda: main(parse_args(argv)), say=fail,
                   interrupted="interrupted: the last completed epoch is in last.pt; continue with -resume")


if __name__ == "__main__":
    cli()
