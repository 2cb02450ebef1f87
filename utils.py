"""The data-loading utilities of the RawNet2 reproduction: listing and reading audio, the wav index,
crops and TTA segments, the training data set and sampler, validation trials, autocast and training
helpers.

Follows the authors' ``utils.py`` / ``trainer`` (github.com/Jungjee/RawNet, python/RawNet2); what
it keeps from them and where it differs is listed once, in docs/FIDELITY.md. Everything numeric here
is checked by tests against an independent computation. TTA embeddings are in tta.py, checkpoints,
record logs and locks in runs.py, torchrun helpers in distributed.py, the torch-free basics in
common.py, trial lists and scores in scoring.py.
"""

import contextlib
import fcntl
import math
import multiprocessing
import os
import random
import stat
import sys
import warnings
import zipfile

import numpy as np
import soundfile as sf
import torch
import torch.nn as nn
from scipy.signal import resample_poly
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

import distributed
import fast_RawNet2
import runs
from common import DataError, error_line, speaker_of, write_atomic

SAMPLE_RATE = 16000


class SilentAudioError(DataError):
    """An empty or all-zero waveform: it cannot be peak-normalised."""


# ---------------------------------------------------------------------------------------------
# Utterance lists, labels, audio

def check_regular_file(path):
    """DataError naming ``path`` unless it is a regular file (or a link to one): a broken link, a
    link loop, a folder or a FIFO (whose read would wait forever) stops with one line."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise DataError(f"{path}: cannot read audio ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a file"
        raise DataError(f"{path}: cannot read audio ({kind}, not a regular file)")


def list_utterances(wav_dir):
    """Sorted keys ``<spk>/<video>/<NNNNN>.wav`` of every wav under ``wav_dir`` (original key rule:
    the last two folder names plus the file name). Linked folders are followed, each folder once (a
    link loop ends there); a ``.wav`` that is not a readable regular file stops with one line."""
    if not os.path.isdir(wav_dir):
        raise DataError(f"{wav_dir}: folder not found (it should hold <speaker>/<video>/<NNNNN>.wav files)")
    keys, seen = [], set()
    for path, dirs, files in os.walk(wav_dir, followlinks=True):
        real = os.path.realpath(path)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        base = "/".join(os.path.normpath(path).split(os.sep)[-2:])
        wavs = [f for f in files if f.endswith(".wav")]
        if wavs and len(os.path.relpath(path, wav_dir).split(os.sep)) != 2:  # (wav_dir itself: '.')
            raise DataError(f"{os.path.join(path, wavs[0])}: not at <speaker>/<video>/<NNNNN>.wav below "
                            f"{wav_dir} (keys are the last two folder names and the file name)")
        for f in wavs:
            check_regular_file(os.path.join(path, f))
        keys.extend(f"{base}/{f}" for f in wavs)
    if not keys:
        raise DataError(f"{wav_dir}: no .wav files found (expected <speaker>/<video>/<NNNNN>.wav)")
    return sorted(keys)


def speaker_labels(keys):
    """Speaker -> class index, in order of first appearance in ``keys``."""
    labels = {}
    for key in keys:
        labels.setdefault(speaker_of(key), len(labels))
    return labels


PREPARE_HINT = " (DB/prepare_dataset.py converts audio to 16 kHz mono)"
# Extensions of the formats libsndfile (soundfile) reads; other formats go through ffmpeg.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".caf",
                    ".w64", ".rf64")


# Frames decoded per read: a header's claimed length is never allocated at once (a FLAC header can
# claim 2^36 frames in a file of a few kilobytes).
READ_BLOCK_FRAMES = 1 << 20
WAV_UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # what streaming writers put in a data size they did not know yet


def _chunks(f, size, order):
    """``(name, position of its data, claimed length)`` of each chunk of an IFF-style file (RIFF:
    little-endian sizes, AIFF: big-endian) after its 12-byte header, read from the open file ``f``."""
    pos = 12
    while pos + 8 <= size:
        f.seek(pos)
        chunk = f.read(8)
        length = int.from_bytes(chunk[4:], order)
        yield chunk[:4], pos + 8, length
        pos += 8 + length + (length & 1)


def _claimed_and_present(f, size):
    """``(frames claimed, frames present)`` of the audio data of a RIFF/WAVE or uncompressed AIFF
    file, or None (another format, or a size that a streaming writer left unknown)."""
    head = f.read(12)
    kind = {(b"RIFF", b"WAVE"): "wav", (b"FORM", b"AIFF"): "aiff"}.get((head[:4], head[8:12]))
    frame_bytes = claimed = None
    for name, pos, length in _chunks(f, size, "little" if kind == "wav" else "big") if kind else ():
        if name == b"fmt " and kind == "wav" and length >= 14:
            frame_bytes = int.from_bytes(f.read(14)[12:14], "little")  # block align
        elif name == b"COMM" and kind == "aiff" and length >= 8:
            comm = f.read(8)
            channels, bits = int.from_bytes(comm[:2], "big"), int.from_bytes(comm[6:8], "big")
            frame_bytes, claimed = channels * -(-bits // 8), int.from_bytes(comm[2:6], "big")
        elif name == b"data" and kind == "wav" and frame_bytes and length not in WAV_UNKNOWN_SIZES:
            return length // frame_bytes, (size - pos) // frame_bytes
        elif name == b"SSND" and kind == "aiff" and frame_bytes and claimed is not None:
            return claimed, max(size - pos - 8, 0) // frame_bytes  # (offset and block size first)
    return None


def check_audio_complete(path):
    """DataError naming ``path`` when it is a wav (or uncompressed AIFF) file whose header claims more
    frames than the file holds (an interrupted copy or download): libsndfile would read the frames
    present and say nothing. Any other file passes."""
    with open(path, "rb") as f:
        found = _claimed_and_present(f, os.fstat(f.fileno()).st_size)
    if found and found[0] > found[1]:
        raise DataError(f"{path}: cut short: its header claims {found[0]} frames of audio, the file holds "
                        f"{found[1]} (an interrupted copy or download?)")


def _decode(path, start=0, frames=-1, always_2d=False):
    """``soundfile.read(path, dtype="float64", start=, frames=, always_2d=)``, decoded a block at a
    time; DataError when fewer frames decode than the header claims."""
    with sf.SoundFile(path) as f:
        wanted = max(f.frames - start, 0) if frames < 0 else min(frames, max(f.frames - start, 0))
        if start and wanted:
            f.seek(start)
        blocks, got = [], 0
        while got < wanted:
            block = f.read(min(READ_BLOCK_FRAMES, wanted - got), dtype="float64", always_2d=True)
            if not len(block):
                break
            blocks.append(block)
            got += len(block)
        if got < wanted:
            raise DataError(f"{path}: cut short: its header claims {start + wanted} frames, "
                            f"{start + got} decode")
        x = blocks[0] if len(blocks) == 1 else np.concatenate(blocks or [np.zeros((0, f.channels))])
        return (x if always_2d or x.shape[1] > 1 else x[:, 0]), f.samplerate


def _is_text(head):
    """Whether the first bytes of a file look like text: no control bytes other than white space."""
    return all(byte >= 32 or byte in b"\t\n\r\f" for byte in head) and b"\x7f" not in head


def decode_failure(path, detail):
    """Why ``path`` cannot be read after its decoder failed with ``detail``: an empty file and a
    text file are named as such; anything else cannot be decoded."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        return f"cannot read audio ({e.strerror})"
    if not head:
        return "cannot read audio (empty file: 0 bytes)"
    if _is_text(head):
        lines = head.decode("utf-8", "replace").splitlines()
        begins = next((line.strip() for line in lines if line.strip()), "")[:40]
        return f"cannot read audio (a text file, not audio; it begins {begins!r})"
    return f"cannot read audio (cannot be decoded: {detail})"


def _read_samples(path, **kwargs):
    """``(float64 samples, rate)`` of an audio file (``kwargs``: soundfile's start/frames/always_2d);
    DataError naming the file when it is not a readable regular file, is cut short
    (``check_audio_complete``; fewer frames than its header claims), or holds NaN or infinite samples
    (a float wav can hold them; they would poison every number)."""
    check_regular_file(path)
    try:
        check_audio_complete(path)
        x, sr = _decode(path, **kwargs)
    except (RuntimeError, sf.LibsndfileError) as e:
        detail = str(e).replace(f"Error opening {os.fspath(path)!r}: ", "")
        raise DataError(f"{path}: {decode_failure(path, detail)}") from None
    except OSError as e:  # e.g. no permission to read it
        raise DataError(f"{path}: cannot read audio ({e.strerror})") from None
    if not np.isfinite(x).all():
        raise DataError(f"{path}: NaN or infinite samples")
    return x, sr


def _read_checked(path, **kwargs):
    """float64 samples of a 16 kHz mono wav (``kwargs``: soundfile's start/frames); DataError else."""
    x, sr = _read_samples(path, **kwargs)
    if x.ndim != 1:
        raise DataError(f"{path}: {x.shape[1]} channels, expected mono{PREPARE_HINT}")
    if sr != SAMPLE_RATE:
        raise DataError(f"{path}: sample rate {sr} Hz, expected {SAMPLE_RATE} Hz{PREPARE_HINT}")
    return x


def to_mono_16k(x, sr):
    """``(samples, note)``: float64 ``x`` (frames, or frames x channels) at ``sr`` Hz as 16 kHz mono.
    Channels are averaged; the rate is changed by polyphase filtering (``scipy.signal.resample_poly``
    with the reduced ratio 16000 / sr, its default Kaiser-windowed anti-aliasing filter: flat within
    1 % up to 7 kHz, -6 dB at 8 kHz, more than 55 dB down from 9.5 kHz). ``note`` says what was
    converted ("" when nothing was)."""
    notes = []
    if x.ndim == 2:
        if x.shape[1] > 1:
            notes.append(f"{x.shape[1]} channels mixed down to mono")
        x = x.mean(axis=1)
    if sr != SAMPLE_RATE:
        g = math.gcd(int(sr), SAMPLE_RATE)
        x = resample_poly(x, SAMPLE_RATE // g, int(sr) // g)
        notes.append(f"resampled from {sr} Hz to {SAMPLE_RATE} Hz")
    return x, ", ".join(notes)


def read_audio(path):
    """``(samples, note)``: any file libsndfile reads (wav, flac, ogg, mp3, ...), at any rate and
    channel count, as float64 16 kHz mono (``to_mono_16k``); DataError naming the file else."""
    return to_mono_16k(*_read_samples(path, always_2d=True))


def peak_normalise(x, path):
    """The original's scaling: float64 divided by its peak |sample|, cast to float32."""
    peak = np.max(np.abs(x)) if x.size else 0.0
    if peak == 0:
        raise SilentAudioError(f"{path}: empty or all-zero audio")
    return (x / peak).astype(np.float32)


def read_wav(path, convert=False):
    """Read a 16 kHz mono wav as the original does: float64, divided by its peak, cast to float32.
    With ``convert``, any file of any rate and channel count, converted first (``read_audio``)."""
    return peak_normalise(read_audio(path)[0] if convert else _read_checked(path), path)


def _index_entry(path):
    x = _read_checked(path)
    return len(x), float(np.max(np.abs(x))) if x.size else 0.0


def _stamp(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


WAV_INDEX_COLUMNS = ("keys", "frames", "peaks", "sizes", "mtimes")


def _read_wav_index(cache):
    """The entries ``key -> (frames, peak, (size, mtime))`` of a cached wav index; a cache that cannot
    be read (truncated, not an index) is left out with a note, and rebuilt."""
    try:
        with np.load(cache, allow_pickle=False) as data:
            columns = [data[name].tolist() for name in WAV_INDEX_COLUMNS]
        if len({len(column) for column in columns}) != 1:
            raise ValueError("columns of different lengths")
    except (OSError, ValueError, TypeError, EOFError, KeyError, zipfile.BadZipFile) as e:
        why = " ".join(str(e).split()) or type(e).__name__
        tqdm.write(f"note: {cache}: unreadable wav index ({why}): indexing again")
        return {}
    return {key: (frames, peak, (size, mtime)) for key, frames, peak, size, mtime in zip(*columns)}


# Files indexed between two appends to the build log of wav_index: a killed build loses at most these.
INDEX_CHUNK = 2048


def wav_index(keys, base_dir, nb_worker=2, progress=True):
    """Length (frames) and peak |sample| of every utterance, so that training reads only each
    crop's frames (``read_crop``). Built once, in ``nb_worker`` processes, and cached atomically
    beside the wav folder as ``<folder>_index.npz``; a file whose size or modification time changed
    since is indexed again. Returns a dict key -> (frames, peak).

    Every process that needs the index calls this: one at a time, each holding a lock on the build
    log ``<folder>_index.log``, so the first builds or completes it and the others wait for the
    lock, never in a collective of a process group (which would time out on a slow disk), then find
    it complete. The build appends every ``INDEX_CHUNK`` files to the log, so the next call continues
    a killed build where it stopped; the complete index goes into the cache and the log is removed.
    """
    base = os.path.normpath(base_dir)
    cache, log_path = base + "_index.npz", base + "_index.log"
    stamps = {k: _stamp(os.path.join(base_dir, k)) for k in keys}
    with _locked_log(log_path) as log:
        index = _read_index(cache, log_path if log else None)
        todo = [k for k in keys if k not in index or index[k][2] != stamps[k]]
        if log and os.fstat(log.fileno()).st_size:  # a killed build's log (its last chunk may be torn):
            _save_index(cache, index)               # its chunks into the cache, then start it empty
            log.truncate(0)
        _index_files(index, todo, base_dir, stamps, log, log_path, nb_worker, progress)
        if log and todo:
            _save_index(cache, index)
        if log:
            os.remove(log_path)  # still locked: a process waiting for it then opens a new log
    return {k: index[k][:2] for k in keys}


def _save_index(cache, index):
    names = sorted(index)
    columns = {"keys": np.array(names), "frames": np.array([index[k][0] for k in names]),
               "peaks": np.array([index[k][1] for k in names]),
               "sizes": np.array([index[k][2][0] for k in names]),
               "mtimes": np.array([index[k][2][1] for k in names])}
    write_atomic(cache, lambda f: np.savez(f, **columns))


@contextlib.contextmanager
def _locked_log(path):
    """The build log at ``path`` opened for appending and locked (``flock``, waiting as long as
    another process holds it; the kernel releases the lock of a process that dies); None, with a
    warning, where it cannot be created (the index is then built in memory, not kept)."""
    while True:
        try:
            f = open(path, "ab")
        except OSError as e:
            warnings.warn(f"{path}: cannot keep the wav index ({e.strerror}); it is built in memory and "
                          f"built again next time", stacklevel=3)
            yield None
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
            break
        f.close()  # the holder removed it while we waited: lock the next one
    with f:
        yield f


def _read_index(cache, log_path):
    """The cached index, completed by the chunks of the build log (None: no log), as a dict
    key -> (frames, peak, (size, mtime))."""
    index = _read_wav_index(cache) if os.path.exists(cache) else {}
    for chunk in runs.read_records(log_path) if log_path else []:
        index.update((k, (n, p, (size, mtime))) for k, n, p, size, mtime in chunk)
    return index


def _index_files(index, todo, base_dir, stamps, log, log_path, nb_worker, progress):
    """Index the files ``todo`` into ``index``, appending each chunk of INDEX_CHUNK files to ``log``
    as a list of (key, frames, peak, size, mtime)."""
    if not todo:
        return
    paths = [os.path.join(base_dir, k) for k in todo]
    chunk = []
    with multiprocessing.get_context("fork").Pool(max(1, nb_worker)) as pool:
        entries = tqdm(pool.imap(_index_entry, paths, chunksize=64), total=len(paths),
                       desc=f"indexing {base_dir}", disable=not progress, leave=False)
        for done, ((frames, peak), key) in enumerate(zip(entries, todo), 1):
            chunk.append((key, frames, peak) + stamps[key])
            if len(chunk) == INDEX_CHUNK or done == len(todo):
                if log:
                    runs.append_record(log, chunk, log_path)
                index.update((k, (n, p, (size, mtime))) for k, n, p, size, mtime in chunk)
                chunk = []


def read_crop(path, frames, peak, nb_samp, rng):
    """The training crop of ``crop_or_tile(read_wav(path), nb_samp, rng)``, reading only its frames:
    ``frames`` and ``peak`` come from ``wav_index``. Same start, same float64 division by the peak,
    same float32 cast, so the same array."""
    if peak == 0:
        raise SilentAudioError(f"{path}: empty or all-zero audio")
    if frames <= nb_samp:
        return crop_or_tile(read_wav(path), nb_samp, rng)
    start = int(rng.integers(0, frames - nb_samp))
    x = _read_checked(path, start=start, frames=nb_samp)
    if len(x) != nb_samp:
        raise DataError(f"{path}: shorter than its wav index says (file changed during training?)")
    return (x / peak).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Cropping and test-time augmentation (TTA) segments

def crop_or_tile(x, nb_samp, rng=None):
    """Training crop: a random ``nb_samp`` window, start uniform in [0, len - nb_samp) (upper bound
    excluded, as the original's ``np.random.randint``), drawn from the numpy Generator ``rng``;
    a shorter waveform is tiled (repeated) and cut to ``nb_samp``."""
    n = len(x)
    if n > nb_samp:
        start = int(rng.integers(0, n - nb_samp))
        return x[start:start + nb_samp]
    if n < nb_samp:
        return np.tile(x, nb_samp // n + 1)[:nb_samp]
    return x


def check_window_size(window_size, nb_samp):
    """DataError unless consecutive TTA segments of ``nb_samp`` samples overlapping by ``window_size``
    advance: 0 <= window_size < nb_samp."""
    if not 0 <= window_size < nb_samp:
        raise DataError(f"-window_size {window_size}: must be from 0 to {nb_samp - 1}, below the "
                        f"segment length nb_samp {nb_samp} (consecutive segments would not advance)")


DEFAULT_WINDOW_SIZE = 11810  # the paper's overlap of consecutive TTA segments


def resolve_window_size(given, model, source):
    """The TTA overlap for ``model`` (loaded from ``source``): ``given`` (a -window_size flag, None when
    not given), else the one its checkpoint records (``model.checkpoint_args``: a last.pt's run
    flags, an ONNX export's metadata), else DEFAULT_WINDOW_SIZE. One note line when the flag overrides
    a recorded value; DataError when segments of the model's nb_samp would not advance."""
    recorded = getattr(model, "checkpoint_args", {}).get("window_size")
    window_size = given if given is not None else recorded if recorded is not None else DEFAULT_WINDOW_SIZE
    if given is not None and recorded is not None and given != recorded:
        print(f"note: -window_size {given} given; {source} records -window_size {recorded}")
    check_window_size(window_size, model.nb_samp)
    return window_size


def check_device(name):
    """``name`` (a -device flag) if the network can run there; DataError naming the flag else: not a
    device, no CUDA GPU visible, a GPU index beyond those visible."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DataError(f"-device {name}: not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise DataError(f"-device {name}: no CUDA GPU is visible here (use -device cpu)")
        if device.index is not None and device.index >= count:
            raise DataError(f"-device {name}: {count} CUDA GPUs are visible, cuda:0 to cuda:{count - 1}")
    elif device.type != "cpu":
        try:
            torch.zeros(1, device=device).cpu()  # (a meta tensor has no data to copy back)
        except (RuntimeError, AssertionError) as e:
            raise DataError(f"-device {name}: not usable here ({error_line(e)[len('error: '):]})") from None
    return name


def tta_segments(x, nb_samp, window_size):
    """TTA segments of one waveform, shape (n, nb_samp). Consecutive segments overlap by
    ``window_size`` samples; the last segment is right-aligned (the final nb_samp samples)."""
    check_window_size(window_size, nb_samp)
    n = len(x)
    if n <= nb_samp:
        return crop_or_tile(x, nb_samp)[None]
    step = nb_samp - window_size
    count = (n - window_size) // step + 1
    starts = [i * step for i in range(count - 1)] + [n - nb_samp]
    return np.stack([x[s:s + nb_samp] for s in starts])


class TrainSet(Dataset):
    """Random crops of training utterances; yields (waveform, label, key).

    The crop of item ``i`` is drawn from a generator seeded by ``(seed, epoch, i)``: the same for any
    number of DataLoader workers, and the same again when a run is resumed. The epoch comes with the
    item (``(epoch, i)``, from EpochSampler; persistent workers hold their own copy of the dataset)
    or, for a plain index, from the ``epoch`` attribute.
    """

    def __init__(self, keys, base_dir, labels, nb_samp, seed=0, index=None):
        self.keys, self.base_dir, self.labels, self.nb_samp = keys, base_dir, labels, nb_samp
        self.seed, self.epoch = seed, 0
        self.index = index  # from wav_index: read only the crop's frames (same array)

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, item):
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        # A silent file is skipped (with a warning) in favour of the next utterance in the list.
        for offset in range(len(self.keys)):
            key = self.keys[(index + offset) % len(self.keys)]
            path = os.path.join(self.base_dir, key)
            rng = np.random.default_rng([self.seed, epoch, index])
            try:
                if self.index is None:
                    x = crop_or_tile(read_wav(path), self.nb_samp, rng)
                else:
                    x = read_crop(path, *self.index[key], self.nb_samp, rng)
            except SilentAudioError as e:
                warnings.warn(f"skipping {e}", stacklevel=2)
                continue
            return x, self.labels[speaker_of(key)], key
        raise DataError(f"{self.base_dir}: every training file is empty or silent")


class EpochSampler(Sampler):
    """The indices of ``sampler`` (e.g. a DistributedSampler) as ``(epoch, index)`` pairs for
    TrainSet, so that one DataLoader with persistent workers serves every epoch."""

    def __init__(self, sampler):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, index) for index in self.sampler)

    def __len__(self):
        return len(self.sampler)


def unwrap_model(model):
    """The network inside nn.DataParallel or DistributedDataParallel; any other model itself."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    return model.module if isinstance(model, wrappers) else model


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_amp_warned = set()


def under_autocast(module, device_type, dtype):
    """``module`` called under autocast to ``dtype``: for a thread of its own, which starts with
    autocast's default dtype (float16 on CUDA) whatever its parent thread set."""
    def run(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return module(*args, **kwargs)
    return run


def amp_autocast(device, amp="bf16"):
    """The autocast context of ``-amp`` (training) and ``-bf16`` (extraction): "none" or False is a
    no-op, "bf16" or True bfloat16 autocast, "fp16" float16 autocast. RawNet2 keeps its sinc front
    end in float32 inside (see ``RawNet2.embed``). Opt-in: it changes the numbers slightly. On a CPU
    without native bfloat16 (no AVX-512 BF16 or AMX, or oneDNN capped below them) bf16 is emulated
    and several times slower than float32 (bench/train_step.py): one line says so, once per process."""
    amp = {True: "bf16", False: "none"}.get(amp, amp)
    device_type = torch.device(device).type
    if amp == "bf16" and device_type == "cpu" and not fast_RawNet2.cpu_has_native_bf16() and not _amp_warned:
        _amp_warned.add(amp)
        if distributed.is_main_process():
            tqdm.write("warning: no native bfloat16 here (no avx512_bf16/amx_bf16 CPU flag, or oneDNN capped "
                       "below them by ONEDNN_MAX_CPU_ISA): bf16 runs emulated and slower than float32; leave "
                       "-amp/-bf16 off for speed", file=sys.stderr)
    return torch.autocast(device_type, dtype=AMP_DTYPES.get(amp), enabled=amp != "none")


def backward_step(loss, optimizer, scaler=None):
    """Gradients of ``loss`` and one optimiser step; with fp16's scaler, the loss is scaled so that
    small gradients do not flush to zero (and a step with inf/NaN gradients is skipped)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def make_validation_trials(keys, nb_trial, rng):
    """Random validation trials (original ``make_validation_trial``): half targets (two different
    utterances of a random speaker), half non-targets (utterances of two random speakers)."""
    by_spk = {}
    for key in keys:
        by_spk.setdefault(speaker_of(key), []).append(key)
    speakers = sorted(by_spk)
    multi = [s for s in speakers if len(by_spk[s]) >= 2]
    if not multi or len(speakers) < 2:
        raise DataError("validation trials need at least two speakers, one with two utterances")
    lines = []
    for spk in rng.choice(multi, size=nb_trial // 2, replace=True):
        a, b = rng.choice(by_spk[spk], size=2, replace=False)
        lines.append(f"1 {a} {b}")
    for _ in range(nb_trial // 2):
        sa, sb = rng.choice(speakers, size=2, replace=False)
        lines.append(f"0 {rng.choice(by_spk[sa])} {rng.choice(by_spk[sb])}")
    return lines


# ---------------------------------------------------------------------------------------------
# Training helpers

def init_weights(module):
    """Original initialisation, applied with ``model.apply``: Linear -> Xavier-uniform weight and
    bias 1e-4; any other module with a ``weight`` except BatchNorm1d (i.e. Conv1d) -> Kaiming-normal
    with a = 0.01; everything else keeps PyTorch's defaults. Called before any SyncBatchNorm
    conversion, as the networks hold BatchNorm1d only."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        module.bias.data.fill_(0.0001)
    elif isinstance(module, nn.BatchNorm1d):
        pass
    elif isinstance(getattr(module, "weight", None), torch.Tensor):
        nn.init.kaiming_normal_(module.weight, a=0.01)


def keras_lr_decay(step, decay=1e-4):
    """Keras' time-based decay: the learning-rate factor after ``step`` optimiser steps."""
    return 1.0 / (1.0 + decay * step)


def adam(params, **kwargs):
    """``torch.optim.Adam`` on its fused kernel: one pass per parameter tensor instead of a dozen
    elementwise operations, the same update to float rounding (1e-7 relative after a few steps), in
    a fraction of the time on a CPU. The optimiser's state dict keeps Adam's layout (its parameter
    groups also say ``fused: True``)."""
    return torch.optim.Adam(params, fused=True, **kwargs)


def param_groups(model, weight_decay):
    """Weight decay for every parameter except those whose name contains 'bn' (original rule)."""
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if "bn" not in n], "weight_decay": weight_decay},
            {"params": [p for n, p in named if "bn" in n], "weight_decay": 0.0}]


def seed_everything(seed, deterministic=True):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def rng_states():
    """Every RNG state, in types that ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                     has_gauss, cached),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    """Restore ``rng_states()``. A run saved with more GPUs than this machine has (``-resume`` on
    fewer) restores the states of the GPUs there are, the others' are left out, with a note."""
    random.setstate(states["python"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        saved, here = states["cuda"], torch.cuda.device_count()
        if len(saved) > here and distributed.is_main_process():
            print(f"note: the checkpoint holds the CUDA random states of {len(saved)} GPUs and this machine "
                  f"shows {here}: {here} restored, {len(saved) - here} left out")
        torch.cuda.set_rng_state_all(saved[:here])
