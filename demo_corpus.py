"""A built-in synthetic speaker-verification corpus: the whole RawNet2 pipeline on a laptop, no download.

`make_demo_corpus()` writes a corpus in the exact VoxCeleb layout the training script reads
(`VoxCeleb2/wav/` to train on; `VoxCeleb1/eval_wav/` and `VoxCeleb1/veri_test.txt` to test on), and
`naive_baseline_eer()` scores its trials with a deliberately naive feature. Synthesis needs numpy,
scipy, soundfile and tqdm; the baseline's EER is the project's (``scoring.compute_eer``,
NumPy only).

Why it is a real task and not a toy:
- Voices come from a source-filter model. Each speaker draws traits from one shared distribution:
  mean F0 and intonation range, vocal-tract length (scales every formant) and small per-formant
  quirks, formant bandwidths, glottal open quotient (source tilt), breathiness, jitter, shimmer,
  speaking rate. Test speakers are new draws: a model must learn the traits, not the identities.
- Content changes with every utterance: random syllables of vowels (Peterson & Barney formant
  targets, smooth transitions), nasal murmurs, fricatives, aspiration, stop bursts and pauses.
- Every "video" is a session with its own channel: a small room's reverb, band limits (telephone to
  wideband), presence/treble colouration, and coloured noise at a random SNR; the speaker's own state
  drifts a little too (F0, voice quality, rate). Target trials pair *different* videos of a speaker
  (cross-session, as in VoxCeleb), so the channel dominates a long-term average spectrum while
  pitch, formant structure and voice quality stay in the waveform.
- Deliberate balance: the channel varies most where speaker cues are weak (noise floor, band edges,
  above 1 kHz) and only mildly below: strong in-band EQ would hide the speaker from a small RawNet2
  trained for a few CPU minutes, and the naive baseline, a long-term average spectrum, stays well
  above the EER the demo model reaches.

Defaults (about 1.7 h of audio): 100 training speakers (`id0NNNN`),
40 test speakers (`id1NNNN`, as many as VoxCeleb1's test set), each 4 videos x 3 utterances of 2-5 s;
trials: every cross-video target pair of the test speakers (2,160) and as many random non-targets.
The same seed gives byte-identical files whatever the number of worker processes.
"""
import argparse
import errno
import json
import multiprocessing
import os
import shutil
import string
from contextlib import nullcontext

import numpy as np
import soundfile as sf
from scipy import fft
from scipy.ndimage import gaussian_filter1d, uniform_filter1d
from tqdm import tqdm

import common
from scoring import compute_eer

SAMPLE_RATE = 16000
HOP, WIN, NFFT = 256, 512, 1024  # 16 ms control rate; zero-padded FFT so filter responses fit
FREQS = fft.rfftfreq(NFFT, 1 / SAMPLE_RATE)
MANIFEST, VERSION = "demo_corpus.json", 3  # bump VERSION whenever the synthesis changes
TRAIN, TEST = 0, 1  # split codes
SPEAKER, SESSION, UTTERANCE, TRIALS = 1, 2, 3, 4  # kinds of random stream

# F1-F3 of ten vowels, men's means from Peterson & Barney (1952); F4 = 3500 and F5 = 4500 Hz.
VOWELS = np.array([[270, 2290, 3010], [390, 1990, 2550], [530, 1840, 2480], [660, 1720, 2410],
                   [730, 1090, 2440], [570, 840, 2410], [440, 1020, 2240], [300, 870, 2240],
                   [640, 1190, 2390], [490, 1350, 1690]], dtype=float)
NASAL = np.array([250, 1100, 2300], dtype=float)
BANDWIDTHS = np.array([60, 80, 110, 160, 220], dtype=float)
FRICATIVES = [(0.5, 5500, 1200), (0.5, 3200, 900), (0.15, 4500, 3500)]  # (level, centre Hz, width Hz)


def _rng(seed, kind, *ids):
    """An independent random stream per (seed, kind, ids), so no result depends on order or workers.

    The kind goes first because numpy's SeedSequence gives [a, b] and [a, b, 0] the same stream.
    """
    return np.random.default_rng([seed, kind, *ids])


def draw_speaker(seed, split, index):
    """Traits of one speaker; training and test speakers come from the same distribution."""
    rng = _rng(seed, SPEAKER, split, index)
    female = rng.random() < 0.5
    return dict(
        f0=np.clip(np.exp(rng.normal(np.log(210.0 if female else 120.0), 0.25)), 70.0, 400.0),
        f0_range=rng.uniform(0.03, 0.07),  # intonation: std of log F0 within an utterance
        formant_scale=np.clip(rng.normal(1.16 if female else 1.0, 0.12), 0.8, 1.45),  # 1 / tract length
        formant_quirks=np.exp(rng.normal(0.0, 0.07, 5)),
        bandwidth_scale=np.exp(rng.normal(0.0, 0.2)),
        open_quotient=rng.uniform(0.4, 0.8),
        breathiness=np.exp(rng.uniform(np.log(0.02), np.log(0.4))),
        jitter=rng.uniform(0.003, 0.02), shimmer=rng.uniform(0.02, 0.12),
        rate=np.exp(rng.normal(0.0, 0.12)))


def draw_session(seed, split, index, video):
    """One video: the speaker's state that day and the channel (room, microphone, noise)."""
    rng = _rng(seed, SESSION, split, index, video)
    speaker = draw_speaker(seed, split, index)
    rt60, drr_db = np.exp(rng.uniform(np.log(0.05), np.log(0.15))), rng.uniform(8.0, 18.0)
    t = np.arange(int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
    tail = rng.standard_normal(t.size) * np.exp(-6.91 * t / rt60)  # decays by 60 dB at rt60
    tail *= 10 ** (-drr_db / 20) / np.sqrt(np.sum(tail ** 2))
    return dict(
        video_id="".join(rng.choice(list(string.ascii_letters + string.digits + "-_"), 11)),
        rir=np.concatenate([[1.0], np.zeros(rng.integers(16, 64)), tail]),
        f0=speaker["f0"] * np.exp(rng.normal(0.0, 0.02)),
        open_quotient=np.clip(speaker["open_quotient"] + rng.normal(0.0, 0.03), 0.3, 0.9),
        breathiness=speaker["breathiness"] * np.exp(rng.normal(0.0, 0.2)),
        rate=speaker["rate"] * np.exp(rng.normal(0.0, 0.05)),
        eq_centres=np.exp(rng.uniform(np.log(1500), np.log(7000), 5)),
        eq_widths=rng.uniform(0.3, 0.8, 5), eq_gains=rng.normal(0.0, 1.5, 5),
        treble=rng.uniform(-1.5, 1.5), highpass=np.exp(rng.uniform(np.log(50), np.log(150))),
        lowpass=rng.uniform(3400, 7800), lowpass_order=rng.integers(2, 5),
        noise_tilt=rng.uniform(-6.0, 0.0), snr_db=rng.uniform(10.0, 35.0))


def channel_gain_db(freqs, session):
    """Microphone and codec response in dB. Deliberately, like real microphones, it colours mostly
    the band edges and the region above 1 kHz: the noise floor and band limits are what vary most."""
    octaves = np.log2(np.maximum(freqs, 20.0) / 1000.0)
    bumps = session["eq_gains"] * np.exp(
        -0.5 * ((octaves[:, None] - np.log2(session["eq_centres"] / 1000.0)) / session["eq_widths"]) ** 2)
    highpass = 10 * np.log10(1 + (session["highpass"] / np.maximum(freqs, 1.0)) ** 4)
    lowpass = 10 * np.log10(1 + (freqs / session["lowpass"]) ** (4 * session["lowpass_order"]))
    return bumps.sum(1) + session["treble"] * np.maximum(octaves, 0.0) - highpass - lowpass


def draw_phones(rng, n_frames, speaker, session):
    """Frame-wise targets of a random phone sequence: formants (n_frames, 5), gates (n_frames, 3) for
    voicing, aspiration and frication, and the frication band's centre and width."""
    scale = speaker["formant_scale"] * speaker["formant_quirks"]
    none = [np.nan] * 5  # no formant target of its own: interpolated from the neighbouring vowels

    def frames(low_ms, high_ms):
        return max(1, round(rng.uniform(low_ms, high_ms) / session["rate"] * SAMPLE_RATE / 1000 / HOP))

    segments = []  # (frames, F1..F5, voicing, aspiration, frication, frication centre, width)
    while sum(s[0] for s in segments) < n_frames:
        if rng.random() < 0.08:
            segments.append((frames(100, 400), *none, 0, 0, 0, 1, 1))  # pause
        onset = rng.choice(["", "fricative", "aspiration", "stop", "nasal"])
        if onset == "fricative":
            level, centre, width = FRICATIVES[rng.integers(len(FRICATIVES))]
            segments.append((frames(70, 150), *none, 0, 0, level, centre * scale[2], width))
        elif onset == "aspiration":
            segments.append((frames(40, 90), *none, 0, 1, 0, 1, 1))
        elif onset == "stop":
            segments.append((frames(40, 80), *none, 0, 0, 0, 1, 1))  # closure, then the burst
            segments.append((1, *none, 0, 0, 1, 2500 * scale[2], 3000))
        elif onset == "nasal":
            segments.append((frames(50, 90), *(np.r_[NASAL, 3500, 4500] * scale), 0.3, 0, 0, 1, 1))
        vowel = np.r_[VOWELS[rng.integers(len(VOWELS))], 3500, 4500] * scale
        segments.append((frames(90, 250), *vowel, rng.uniform(0.6, 1.0), 0, 0, 1, 1))
    full = np.repeat([s[1:] for s in segments], [s[0] for s in segments], axis=0)
    table = full[:n_frames]
    formants, index = table[:, :5], np.arange(n_frames)
    if np.isnan(formants).all():  # no vowel within a short utterance: the targets of the next one
        formants[:] = full[~np.isnan(full[:, 0]), :5][0]
    for k in range(5):
        known = ~np.isnan(formants[:, k])
        formants[:, k] = np.interp(index, index[known], formants[known, k])
    return uniform_filter1d(formants, 3, axis=0), table[:, 5:8], table[:, 8], table[:, 9]


def glottal_source(rng, f0, voicing, aspiration, speaker, session):
    """Excitation per sample: Rosenberg glottal-flow derivative with per-period jitter and shimmer,
    plus breath noise pulsed by the glottal opening."""
    phase = np.cumsum(f0) / SAMPLE_RATE
    jitter = 1 + speaker["jitter"] * rng.standard_normal(int(phase[-1]) + 2)
    phase = np.cumsum(f0 * jitter[phase.astype(int)]) / SAMPLE_RATE
    shimmer = 1 + speaker["shimmer"] * rng.standard_normal(int(phase[-1]) + 2)
    p, open_quotient = phase % 1.0, session["open_quotient"]
    rise, fall = 0.65 * open_quotient, 0.35 * open_quotient
    flow = np.where(p < rise, 0.5 - 0.5 * np.cos(np.pi * p / rise),
                    np.where(p < open_quotient, np.cos(0.5 * np.pi * (p - rise) / fall), 0.0))
    pulses = np.diff(flow, prepend=0.0) * shimmer[phase.astype(int)] * voicing
    breath = 0.05 * (session["breathiness"] * voicing * (0.3 + flow) + 0.5 * aspiration)
    return pulses + breath * rng.standard_normal(f0.size)


def vocal_tract_log_gain(formants, bandwidths):
    """Natural-log magnitude on FREQS of a cascade of resonances (unit gain at DC), per frame."""
    peaks = np.sum(np.log(formants ** 2), axis=1, keepdims=True)
    f, F, B = FREQS, formants[:, :, None], bandwidths[:, :, None]
    return peaks - 0.5 * np.log(np.prod((F ** 2 - f ** 2) ** 2 + (B * f) ** 2, axis=1))


def overlap_add_filter(excitation, noise, log_gain, fric_gain):
    """Time-varying filter: Hann frames at 50 % overlap, one spectral envelope per frame. The vocal
    tract is made minimum phase (folded real cepstrum) so it rings causally like a resonator; the
    frication band is zero phase, delayed 64 samples to stay inside the frame."""
    n_frames = log_gain.shape[0]
    window = np.hanning(WIN + 1)[:WIN]  # periodic Hann: copies shifted by WIN / 2 sum to one

    def spectra(x):
        padded = np.pad(x, (0, n_frames * HOP + WIN - x.size))
        frames = np.lib.stride_tricks.sliding_window_view(padded, WIN)[::HOP][:n_frames]
        return fft.rfft(frames * window, NFFT)

    fold = np.r_[1.0, np.full(NFFT // 2 - 1, 2.0), 1.0, np.zeros(NFFT // 2 - 1)]
    min_phase = np.exp(fft.rfft(fft.irfft(log_gain, NFFT) * fold))
    delay = np.exp(-2j * np.pi * FREQS * 64 / SAMPLE_RATE)
    out_frames = fft.irfft(spectra(excitation) * min_phase + spectra(noise) * fric_gain * delay, NFFT)
    chunks = out_frames.reshape(n_frames, NFFT // HOP, HOP)
    out = np.zeros((n_frames + NFFT // HOP, HOP))
    for k in range(NFFT // HOP):
        out[k:k + n_frames] += chunks[:, k]
    return out.reshape(-1)[:excitation.size]


def synthesise_utterance(rng, n_samples, speaker, session):
    """One clean utterance (float64, arbitrary scale)."""
    n_frames = n_samples // HOP + 2
    formants, gates, fric_centre, fric_width = draw_phones(rng, n_frames, speaker, session)
    centres, t = np.arange(n_frames) * HOP + WIN / 2, np.arange(n_samples)
    contour = gaussian_filter1d(rng.standard_normal(n_frames), 12)  # ~200 ms pitch movements
    contour *= speaker["f0_range"] / (contour.std() + 1e-9)
    contour += np.linspace(0.5, -0.5, n_frames) * speaker["f0_range"]  # declination
    f0 = np.interp(t, centres, session["f0"] * np.exp(contour))
    voicing, aspiration, frication = (np.interp(t, centres, gate) for gate in gates.T)
    excitation = glottal_source(rng, f0, voicing, aspiration, speaker, session)
    noise = 0.02 * frication * rng.standard_normal(n_samples)
    bandwidths = np.broadcast_to(BANDWIDTHS * speaker["bandwidth_scale"], formants.shape)
    fric_gain = np.exp(-0.5 * ((FREQS - fric_centre[:, None]) / fric_width[:, None]) ** 2)
    return overlap_add_filter(excitation, noise, vocal_tract_log_gain(formants, bandwidths), fric_gain)


def apply_channel(rng, speech, session):
    """Room reverb and microphone response in one FFT product, then coloured noise at the SNR."""
    n = speech.size
    size = fft.next_fast_len(n + session["rir"].size, real=True)  # linear, not circular, convolution
    freqs = fft.rfftfreq(size, 1 / SAMPLE_RATE)
    gain = 10 ** (np.interp(freqs, FREQS, channel_gain_db(FREQS, session)) / 20)  # smooth: coarse grid
    wet = fft.irfft(fft.rfft(speech, size) * fft.rfft(session["rir"], size) * gain, size)[:n]
    colour = (np.maximum(freqs, 50.0) / 1000.0) ** (session["noise_tilt"] / 20 * np.log2(10))
    white = rng.standard_normal(2 * freqs.size).view(np.complex128)  # white noise drawn as a spectrum
    noise = fft.irfft(white * colour, size)[:n]
    snr_db = session["snr_db"] + rng.normal(0.0, 2.0)
    noisy = wet + noise * np.sqrt(np.mean(wet ** 2) / np.mean(noise ** 2) * 10 ** (-snr_db / 10))
    return noisy / np.max(np.abs(noisy)) * rng.uniform(0.3, 0.95)  # random recording level


def _write_session(task):
    """Synthesise and write the utterances of one video; returns (split, keys, samples written)."""
    out_dir, seed, split, index, video, n_utterances, min_seconds, max_seconds = task
    speaker, session = draw_speaker(seed, split, index), draw_session(seed, split, index, video)
    folder = f"id{split}{index + 1:04d}/{session['video_id']}"
    os.makedirs(os.path.join(out_dir, folder))
    keys, n_samples = [], 0
    for utterance in range(n_utterances):
        rng = _rng(seed, UTTERANCE, split, index, video, utterance)
        n = int(rng.uniform(min_seconds, max_seconds) * SAMPLE_RATE)
        wav = apply_channel(rng, synthesise_utterance(rng, n, speaker, session), session)
        keys.append(f"{folder}/{utterance + 1:05d}.wav")
        sf.write(os.path.join(out_dir, keys[-1]), wav, SAMPLE_RATE, subtype="PCM_16")
        n_samples += n
    return split, keys, n_samples


def make_trials(seed, keys):
    """Trial lines: every cross-video same-speaker pair (1) and as many random other-speaker pairs (0).
    With a single video per speaker, same-video pairs are the only targets there are."""
    keys = sorted(keys)
    speaker, video = (np.array([k.split("/")[part] for k in keys]) for part in (0, 1))
    i, j = np.triu_indices(len(keys), 1)
    targets = np.flatnonzero((speaker[i] == speaker[j]) & (video[i] != video[j]))
    if targets.size == 0:
        targets = np.flatnonzero(speaker[i] == speaker[j])
    rng = _rng(seed, TRIALS)
    others = np.flatnonzero(speaker[i] != speaker[j])
    non_targets = rng.choice(others, min(targets.size, others.size), replace=False)
    lines = [f"{label} {keys[i[t]]} {keys[j[t]]}" for label, chosen in ((1, targets), (0, non_targets))
             for t in chosen]
    return [lines[k] for k in rng.permutation(len(lines))]


def _manifest(root):
    """The manifest of the demo corpus at `root`, None if `root` is absent or an empty folder."""
    path = os.path.join(root, MANIFEST)
    if os.path.isfile(path):
        with open(path) as f:
            try:
                manifest = json.load(f)
            except ValueError:  # unreadable: not trusted as ours
                manifest = {}
        if manifest.get("generator") == "demo_corpus.py":
            return manifest
    if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise FileExistsError(errno.EEXIST, f"exists and is not a demo corpus (no valid {MANIFEST}): "
                                            "not overwriting it", root)
    return None


def _run_sessions(tasks, workers, progress):
    """Run `_write_session` on every task, in worker processes if more than one; returns the keys
    written per split and the number of samples."""
    n_workers = min(workers or os.cpu_count() or 1, len(tasks))
    # fork: workers inherit this module even when a script imported it; they never touch torch.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(n_workers) if n_workers > 1 else nullcontext()
    run = pool.imap_unordered if n_workers > 1 else map
    keys, n_samples = {TRAIN: [], TEST: []}, 0
    bar = tqdm(total=len(tasks), desc="synthesising demo corpus", unit="video", disable=not progress)
    with pool, bar:
        for split, session_keys, n in run(_write_session, tasks):
            keys[split] += session_keys
            n_samples += n
            bar.update()
    return keys, n_samples


def make_demo_corpus(root="DB/demo", seed=1234, n_train_speakers=100, n_test_speakers=40, n_videos=4,
                     n_utterances=3, min_seconds=2.0, max_seconds=5.0, workers=None, progress=True):
    """Synthesise the demo corpus into `root` (or reuse it) and return `root`.

    A corpus whose manifest records the same parameters is reused as is. Otherwise the corpus is
    built in a sibling folder and moved into place once complete, its manifest written last, so an
    interrupted run never leaves a corpus that looks complete. Only a demo corpus of other parameters
    (one with our manifest) or an empty folder is ever replaced.
    """
    params = dict(version=VERSION, seed=seed, n_train_speakers=n_train_speakers,
                  n_test_speakers=n_test_speakers, n_videos=n_videos, n_utterances=n_utterances,
                  min_seconds=min_seconds, max_seconds=max_seconds)
    path = os.path.normpath(root)
    old = _manifest(path)
    if old is not None and old["params"] == params:
        return root
    partial = f"{path}.partial-{os.getpid()}"
    os.makedirs(partial)
    try:
        dirs = {TRAIN: os.path.join(partial, "VoxCeleb2", "wav"),
                TEST: os.path.join(partial, "VoxCeleb1", "eval_wav")}
        tasks = [(dirs[split], seed, split, index, video, n_utterances, min_seconds, max_seconds)
                 for split, n_speakers in ((TRAIN, n_train_speakers), (TEST, n_test_speakers))
                 for index in range(n_speakers) for video in range(n_videos)]
        keys, n_samples = _run_sessions(tasks, workers, progress)
        trials = make_trials(seed, keys[TEST])
        with open(os.path.join(partial, "VoxCeleb1", "veri_test.txt"), "w") as f:
            f.write("\n".join(trials) + "\n")
        counts = dict(train_utterances=len(keys[TRAIN]), test_utterances=len(keys[TEST]),
                      trials=len(trials), target_trials=sum(t.startswith("1") for t in trials),
                      hours=round(n_samples / SAMPLE_RATE / 3600, 3))
        with open(os.path.join(partial, MANIFEST), "w") as f:  # written last: marks the corpus complete
            json.dump(dict(generator="demo_corpus.py", params=params, counts=counts), f, indent=1)
        if os.path.isdir(path):
            _manifest(path)  # checked again: replace only our own corpus or an empty folder
            os.replace(path, f"{partial}.old")
        os.replace(partial, path)
        shutil.rmtree(f"{partial}.old", ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return root


def mean_log_spectrum(wav, n_fft=512, hop=160):
    """Long-term average log-magnitude spectrum of a peak-normalised waveform (Hann window)."""
    frames = np.lib.stride_tricks.sliding_window_view(wav / np.max(np.abs(wav)), n_fft)[::hop]
    return np.log(np.abs(np.fft.rfft(frames * np.hanning(n_fft))) + 1e-8).mean(axis=0)


def naive_baseline_eer(root="DB/demo"):
    """EER (fraction) on `veri_test.txt` of the cosine similarity between mean log-magnitude spectra."""
    with open(os.path.join(root, "VoxCeleb1", "veri_test.txt")) as f:
        trials = [line.split() for line in f if line.strip()]
    spectra = {}
    for key in sorted({key for _, a, b in trials for key in (a, b)}):
        spectrum = mean_log_spectrum(sf.read(os.path.join(root, "VoxCeleb1", "eval_wav", key))[0])
        spectra[key] = spectrum / np.linalg.norm(spectrum)
    scores = [float(spectra[a] @ spectra[b]) for _, a, b in trials]
    return compute_eer([int(label) for label, _, _ in trials], scores)[0]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Synthesise the demo corpus, print its naive baseline EER.")
    add = common.arg_group(parser, "corpus")
    add("root", default="DB/demo", help="corpus folder (built, or reused if complete)")
    add("seed", type=int, default=1234, help="random seed; same seed, identical files")
    add("n_train_speakers", type=int, default=100, help="speakers under VoxCeleb2/wav/")
    add("n_test_speakers", type=int, default=40, help="speakers under VoxCeleb1/eval_wav/")
    add("n_videos", type=int, default=4, help="sessions (videos) per speaker")
    add("n_utterances", type=int, default=3, help="utterances per video")
    add("min_seconds", type=float, default=2.0, help="shortest utterance, seconds")
    add("max_seconds", type=float, default=5.0, help="longest utterance, seconds")
    add("workers", type=int, default=None, help="worker processes (default: one per core)")
    return parser.parse_args(argv)


MAX_SECONDS = 600  # an utterance of more than ten minutes is a typo, not a setting


def check_flags(args):
    """One line naming the flag for a value no corpus can be built with; before anything is written.
    (Trials need two test speakers and two utterances of each; the synthesis needs 1 s or more.)"""
    checks = (("n_train_speakers", args.n_train_speakers >= 0, "must not be negative"),
              ("n_test_speakers", args.n_test_speakers >= 2, "must be at least 2"),
              ("n_videos", args.n_videos >= 1, "must be at least 1"),
              ("n_utterances", args.n_utterances >= 1 and args.n_videos * args.n_utterances >= 2,
               "must be at least 1, and at least 2 with -n_videos 1"),
              ("min_seconds", 1 <= args.min_seconds <= MAX_SECONDS, f"must be from 1 to {MAX_SECONDS}"),
              ("max_seconds", args.min_seconds <= args.max_seconds <= MAX_SECONDS,
               f"must be from -min_seconds to {MAX_SECONDS}"),
              ("workers", args.workers is None or args.workers >= 1, "must be at least 1"))
    for flag, ok, why in checks:
        if not ok:
            raise common.DataError(f"-{flag} {getattr(args, flag)}: {why}")


def main(args):
    check_flags(args)
    root = make_demo_corpus(args.root, args.seed, args.n_train_speakers, args.n_test_speakers,
                            args.n_videos, args.n_utterances, args.min_seconds, args.max_seconds,
                            workers=args.workers)
    print(f"demo corpus: {root}; naive baseline (cosine of mean log-spectra) EER "
          f"{100 * naive_baseline_eer(root):.2f} %")


if __name__ == "__main__":
    common.run_cli(lambda: main(parse_args()))
