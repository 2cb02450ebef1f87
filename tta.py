"""Test-time augmentation (TTA) embeddings: each utterance cut into overlapping segments
(``utils.tta_segments``), the segments packed into forwards of one size, their embeddings averaged.
Every embedding path of the repository (validation, -extract, -verify, export checks) runs through
``tta_embeddings``.
"""

import collections
import contextlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

import fast_RawNet2
import utils
from common import DataError, usable_cores, utt_id


def read_tta_segments(key, base_dir, nb_samp, window_size, convert=False):
    """All TTA segments of one utterance: (key, segments (n, nb_samp)). A silent utterance gives
    zero segments, so the consumer can skip and list it. ``convert``: ``utils.read_wav(convert=True)``."""
    try:
        x = utils.read_wav(os.path.join(base_dir, key), convert)
    except utils.SilentAudioError:
        return key, torch.zeros(0, nb_samp)
    return key, torch.from_numpy(utils.tta_segments(x, nb_samp, window_size))


def read_ahead(read, items, threads):
    """``read(item)`` for each of ``items``, in order. With ``threads`` > 0, that many threads read up
    to two items each ahead of the caller, so that files are read and cut while the model runs (file
    reads and NumPy copies release the GIL); threads, not DataLoader processes, because the model
    keeps the cores busy anyway, and worker processes cost a start-up and a shared-memory copy per
    item, which small files do not repay. An error raises here as it was."""
    if threads <= 0:
        yield from map(read, items)
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="read-ahead")
    ahead = collections.deque()
    try:
        for item in items:
            ahead.append(pool.submit(read, item))
            if len(ahead) > 2 * threads:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def tta_embeddings(forward, utterances, segments_per_forward, pad_last=True):
    """The TTA embedding of each utterance: the mean of its segments' embeddings. The one place that
    packs segments into forwards and averages them; every embedding path of the repository runs it.

    ``utterances`` yields ``(key, segments)``, an (n, samples) tensor per utterance (n = 0 for a
    silent file); ``forward`` maps an (m, samples) batch to its (m, dim) embeddings. Segments of
    consecutive utterances are packed into forwards of exactly ``segments_per_forward``, a long
    utterance split over several, the last forward padded with silent segments (their embeddings
    dropped; ``pad_last`` False runs it short instead): every segment goes through the kernels of
    one batch size, whichever utterances share its forward, so an extraction resumed after a kill
    writes the numbers an uninterrupted one does, and ``-verify`` scores a file's embedding as
    ``-extract`` writes it (in eval mode a segment's embedding does not depend on its batch-mates'
    values). Yields
    ``(key, embedding)`` in order, each as soon as its segments are done: a float32 numpy vector,
    or None for a silent file.
    """
    pending = collections.deque()   # segment tensors not yet run, in order
    waiting = collections.deque()   # (key, segment count) of the utterances not yet done
    codes, done = [], 0             # embeddings of their segments so far, and how many

    def take(n):  # the first n pending segments (fewer if fewer are pending)
        parts = []
        while n and pending:
            head = pending.popleft()
            parts.append(head[:n])
            if len(head) > n:
                pending.appendleft(head[n:])
            n -= len(parts[-1])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def finished():  # the utterances whose segments are all embedded, in order
        nonlocal done
        while waiting and waiting[0][1] <= done:
            key, n = waiting.popleft()
            if n == 0:
                yield key, None
                continue
            embedded = torch.cat(codes)
            codes[:] = [embedded[n:]] if len(embedded) > n else []
            done -= n
            yield key, embedded[:n].mean(0).numpy()

    def run(last):
        nonlocal done
        while pending and (last or sum(map(len, pending)) >= segments_per_forward):
            batch = take(segments_per_forward)
            real = len(batch)
            if pad_last and real < segments_per_forward:  # the last forward: padded with silence
                batch = torch.cat([batch, batch.new_zeros(segments_per_forward - real, *batch.shape[1:])])
            codes.append(forward(batch)[:real].float().cpu())
            done += real
            yield from finished()
        yield from finished()

    for key, segments in utterances:
        if len(segments):
            pending.append(segments)
        waiting.append((key, len(segments)))
        yield from run(last=False)
    yield from run(last=True)


def finite(code, where):
    """``code``, an utterance's TTA embedding (or None); one with NaN or infinite values (the network
    overflowed) is a DataError naming ``where``, never an embedding written or scored."""
    if code is not None and not np.isfinite(code).all():
        raise DataError(f"{where}: its embedding holds NaN or infinite values (the network overflowed; "
                        f"in float32, without -bf16, it may not)")
    return code


def model_forward(model, device, bf16=False):
    """``segments -> embeddings`` of a network in eval mode (``model.embed``), on ``device``, under
    ``-bf16``'s autocast where asked."""
    def forward(batch):
        with utils.amp_autocast(device, bf16):
            return model.embed(batch.to(device))
    return forward


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode for the duration, then back to the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def iter_embeddings(model, keys, base_dir, nb_samp, window_size, device="cpu", nb_worker=0,
                    segments_per_batch=None, bf16=False, convert=False, skip_unreadable=False):
    """Yield ``(key, embedding)`` for each of ``keys`` read from ``base_dir``, as soon as it is done
    (``tta_embeddings``: float32 numpy vectors, None for a silent or empty file).

    ``segments_per_batch``: segments per forward; None takes the fixed rule of
    ``fast_RawNet2.segments_per_forward`` (16 for the paper model on CPU; 1 is the authors' loop).
    Each file is read once, ahead of the model by ``nb_worker`` threads (``read_ahead``; at most one
    per usable core), or by the caller's thread with 0. In eval mode each segment's embedding is
    independent of its batch-mates. ``convert``: files of any format, rate and channel count are
    converted to 16 kHz mono as they are read. ``skip_unreadable``: a file that cannot be read
    (DataError) yields its one-line reason (a str) in place of an embedding instead of stopping.
    """
    utils.check_window_size(window_size, nb_samp)
    net = utils.unwrap_model(model)
    size = segments_per_batch or fast_RawNet2.segments_per_forward(net, device)
    reasons = {}

    def read(key):
        try:
            return read_tta_segments(key, base_dir, nb_samp, window_size, convert)
        except DataError as e:
            if not skip_unreadable:
                raise
            reasons[key] = str(e)
            return key, torch.zeros(0, nb_samp)

    utterances = read_ahead(read, keys, min(nb_worker, usable_cores()))
    try:
        with eval_mode(net):
            for key, code in tta_embeddings(model_forward(net, device, bf16), utterances, size):
                yield key, (finite(code, os.path.join(base_dir, key)) if code is not None
                            else reasons.pop(key, None))
    finally:
        utterances.close()


def embed_utterances(model, keys, base_dir, nb_samp, window_size, device="cpu", nb_worker=0,
                     segments_per_batch=None, progress=True, desc="TTA embeddings", bf16=False):
    """TTA embeddings of ``keys`` read from ``base_dir`` (see ``iter_embeddings``). Returns
    ``(embeddings, skipped)``: a dict utterance id (no ``.wav``) -> float32 numpy vector, and the
    keys of silent files."""
    embeddings, skipped = {}, []
    stream = iter_embeddings(model, keys, base_dir, nb_samp, window_size, device, nb_worker,
                             segments_per_batch, bf16)
    for key, code in tqdm(stream, total=len(keys), desc=desc, disable=not progress, leave=False):
        if code is None:
            skipped.append(key)
        else:
            embeddings[utt_id(key)] = code
    return embeddings, skipped


@torch.no_grad()
def embed_utterance(model, wav, window_size=None, device="cpu", segments_per_batch=None, bf16=False):
    """TTA embedding of one utterance (a wav path or a 1-D waveform array), for notebooks:

        model = model_RawNet2.load_pretrained("Pre-trained_model/rawnet2_best_weights.pt")
        code = tta.embed_utterance(model, "a.wav")     # (1024,) float32

    ``window_size`` None takes what the checkpoint records (a last.pt of train_RawNet2.py), else
    the paper's 11810 (``utils.resolve_window_size``). A long recording is fed ``segments_per_batch``
    segments at a time (None: the rule of ``fast_RawNet2.segments_per_forward``, as
    ``iter_embeddings``), so memory stays bounded. A file of another rate or channel count is
    converted (``utils.read_audio``) with a note on stderr.
    """
    net = utils.unwrap_model(model)
    if window_size is None:
        window_size = utils.resolve_window_size(None, net, "the model")
    utils.check_window_size(window_size, net.nb_samp)
    if isinstance(wav, (str, os.PathLike)):
        x, note = utils.read_audio(wav)
        if note:
            print(f"note: {os.fspath(wav)}: {note}", file=sys.stderr)
        x = utils.peak_normalise(x, wav)
    else:
        x = np.asarray(wav, dtype=np.float32)
    segments = torch.from_numpy(np.ascontiguousarray(utils.tta_segments(x, net.nb_samp, window_size)))
    size = segments_per_batch or fast_RawNet2.segments_per_forward(net, device)
    with eval_mode(net):
        [(_, code)] = tta_embeddings(model_forward(net, device, bf16), [(None, segments)], size)
    return finite(code, os.fspath(wav) if isinstance(wav, (str, os.PathLike)) else "the waveform")
