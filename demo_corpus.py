"""A built-in synthetic speaker-verification corpus, so the whole RawNet2 pipeline runs with no download.

`make_demo_corpus()` writes a small corpus in the exact VoxCeleb layout the training script reads
(`VoxCeleb2/wav/` for training, `VoxCeleb1/eval_wav/` + `VoxCeleb1/veri_test.txt` for evaluation),
and `naive_baseline_eer()` scores its trials with a deliberately naive feature. Numpy + scipy only.

Why it is a real task and not a toy:
- Voices come from a source-filter model with speaker traits drawn from one shared distribution:
  mean F0 and intonation range, vocal-tract length (scales all formants) plus small per-formant
  idiosyncrasies, formant bandwidths, glottal open quotient (source tilt), breathiness, jitter,
  shimmer and speaking rate. Test speakers are new draws, so a model must learn the traits, not ids.
- Content varies per utterance: random syllables of vowels (Peterson & Barney formant targets with
  smoothed transitions), nasal murmurs, fricatives, aspirations, stop closures with bursts and pauses.
- Every "video" is a session with its own channel: random EQ bumps, tilt, high-/low-pass band
  limits, a short synthetic room reverb and coloured noise at a random SNR, plus a small drift of
  the speaker's own state (F0, voice quality, rate). Target trials pair *different* videos of a
  speaker (cross-session, as in VoxCeleb), so the channel dominates a long-term average spectrum
  while pitch, formant structure and voice quality remain in the waveform.

Default size (about 1 h of audio): 80 training speakers (`id0NNNN`) and 20 test speakers (`id1NNNN`),
each 4 videos x 3 utterances of 2-5 s; trials = every cross-video target pair of the test speakers
(1,080) plus as many random non-target pairs. Same seed -> byte-identical files for any worker count.
"""
import argparse
import json
import multiprocessing
import os
import shutil
import string
import tempfile
from contextlib import nullcontext

import numpy as np
import soundfile as sf
from scipy import fft as sp_fft
from scipy.interpolate import interp1d
from scipy.ndimage import gaussian_filter1d, uniform_filter1d
from scipy.optimize import brentq
from sklearn.metrics import roc_curve
from tqdm import tqdm

SAMPLE_RATE = 16000
HOP, WIN, NFFT = 256, 512, 1024  # 16 ms control rate; FFT zero-padded so filter responses fit
FREQS = np.fft.rfftfreq(NFFT, 1 / SAMPLE_RATE)
MANIFEST, VERSION = "demo_corpus.json", 2  # bump whenever the synthesis changes
TRAIN, TEST = 0, 1  # split codes
SPEAKER, SESSION, UTTERANCE, TRIALS = 1, 2, 3, 4  # random stream kinds

# F1-F3 of ten vowels, men's means of Peterson & Barney (1952); F4, F5 fixed before scaling.
VOWELS = np.array([[270, 2290, 3010], [390, 1990, 2550], [530, 1840, 2480], [660, 1720, 2410],
                   [730, 1090, 2440], [570, 840, 2410], [440, 1020, 2240], [300, 870, 2240],
                   [640, 1190, 2390], [490, 1350, 1690]], dtype=float)
NASAL = np.array([250, 1100, 2300], dtype=float)
BANDWIDTHS = np.array([60, 80, 110, 160, 220], dtype=float)
# Fricative-like noise: (amplitude, centre Hz, width Hz) of a Gaussian spectral bump.
FRICATIVES = [(0.5, 5500, 1200), (0.5, 3200, 900), (0.15, 4500, 3500)]


def _rng(seed, kind, *ids):
    """An independent random stream per (seed, kind, ids): results never depend on order or workers.

    The kind comes first because numpy's SeedSequence treats [a, b] and [a, b, 0] alike.
    """
    return np.random.default_rng([seed, kind, *ids])


def draw_speaker(seed, split, index):
    """Speaker traits; train and test speakers come from the same distribution."""
    rng = _rng(seed, SPEAKER, split, index)
    female = rng.random() < 0.5
    return dict(
        f0=np.exp(rng.normal(np.log(210.0 if female else 120.0), 0.25)),
        f0_range=rng.uniform(0.03, 0.07),  # intonation, std of log F0
        formant_scale=rng.normal(1.16 if female else 1.0, 0.12),  # 1 / vocal-tract length
        formant_idio=np.exp(rng.normal(0.0, 0.07, 5)),
        bandwidth_scale=np.exp(rng.normal(0.0, 0.2)),
        open_quotient=rng.uniform(0.4, 0.8),
        breathiness=np.exp(rng.uniform(np.log(0.02), np.log(0.4))),
        jitter=rng.uniform(0.003, 0.02), shimmer=rng.uniform(0.02, 0.12),
        rate=np.exp(rng.normal(0.0, 0.12)))


def draw_session(seed, split, index, video):
    """One video: the speaker's state of the day and the channel (room, microphone, noise)."""
    rng = _rng(seed, SESSION, split, index, video)
    speaker = draw_speaker(seed, split, index)
    rt60, drr_db = np.exp(rng.uniform(np.log(0.05), np.log(0.15))), rng.uniform(8.0, 18.0)
    t = np.arange(int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
    tail = rng.standard_normal(t.size) * np.exp(-6.91 * t / rt60)  # -60 dB at rt60
    tail *= 10 ** (-drr_db / 20) / np.sqrt(np.sum(tail ** 2))
    rir = np.concatenate([[1.0], np.zeros(int(rng.integers(16, 64))), tail])
    video_id = "".join(rng.choice(list(string.ascii_letters + string.digits + "-_"), 11))
    return dict(
        video_id=video_id, rir=rir,
        f0=speaker["f0"] * np.exp(rng.normal(0.0, 0.02)),
        open_quotient=np.clip(speaker["open_quotient"] + rng.normal(0.0, 0.03), 0.3, 0.9),
        breathiness=speaker["breathiness"] * np.exp(rng.normal(0.0, 0.2)),
        rate=speaker["rate"] * np.exp(rng.normal(0.0, 0.05)),
        eq_centres=np.exp(rng.uniform(np.log(1500), np.log(7000), 5)),
        eq_widths=rng.uniform(0.3, 0.8, 5), eq_gains=rng.normal(0.0, 1.5, 5),
        treble=rng.uniform(-1.5, 1.5), highpass=np.exp(rng.uniform(np.log(50), np.log(150))),
        lowpass=rng.uniform(3400, 7800), lowpass_order=int(rng.integers(2, 5)),
        noise_tilt=rng.uniform(-6.0, 0.0), snr_db=rng.uniform(10.0, 35.0))


def channel_gain_db(freqs, session):
    """Microphone/codec response of one session in dB: presence bumps, treble tilt, band limits.

    Like real microphones, the colouration sits mostly at the band edges and above 1 kHz.
    """
    octaves = np.log2(np.maximum(freqs, 20.0) / 1000.0)
    centres = np.log2(session["eq_centres"] / 1000.0)
    bumps = session["eq_gains"] * np.exp(-0.5 * ((octaves[:, None] - centres) / session["eq_widths"]) ** 2)
    highpass = 10 * np.log10(1 + (session["highpass"] / np.maximum(freqs, 1.0)) ** 4)
    lowpass = 10 * np.log10(1 + (freqs / session["lowpass"]) ** (4 * session["lowpass_order"]))
    return bumps.sum(1) + session["treble"] * np.maximum(octaves, 0.0) - highpass - lowpass


def draw_phones(rng, n_frames, speaker, session):
    """Frame-wise targets of a random phone sequence: formants (NaN = interpolate), voicing, noise."""
    scale = speaker["formant_scale"] * speaker["formant_idio"]
    nan5 = [np.nan] * 5  # formants of a segment that has none of its own

    def ms(low, high):  # a random duration in frames, scaled by the speaking rate
        return max(1, round(rng.uniform(low, high) / session["rate"] * SAMPLE_RATE / 1000 / HOP))

    columns = []  # per segment: (frames, F1..F5, voice, aspiration, frication, fric centre, fric width)
    while sum(c[0] for c in columns) < n_frames:
        if rng.random() < 0.08:
            columns.append((ms(100, 400), *nan5, 0, 0, 0, 1, 1))  # pause
        onset = rng.choice(["", "fricative", "h", "stop", "nasal"])
        if onset == "fricative":
            amp, centre, width = FRICATIVES[rng.integers(len(FRICATIVES))]
            columns.append((ms(70, 150), *nan5, 0, 0, amp, centre * scale[2], width))
        elif onset == "h":
            columns.append((ms(40, 90), *nan5, 0, 1.0, 0, 1, 1))
        elif onset == "stop":
            columns.append((ms(40, 80), *nan5, 0, 0, 0, 1, 1))
            columns.append((1, *nan5, 0, 0, 1.0, 2500 * scale[2], 3000))
        elif onset == "nasal":
            columns.append((ms(50, 90), *(np.r_[NASAL, 3500, 4500] * scale), 0.3, 0, 0, 1, 1))
        vowel = np.r_[VOWELS[rng.integers(len(VOWELS))], 3500, 4500] * scale
        columns.append((ms(90, 250), *vowel, rng.uniform(0.6, 1.0), 0, 0, 1, 1))
    table = np.repeat(np.array([c[1:] for c in columns]), [c[0] for c in columns], axis=0)[:n_frames]
    formants = table[:, :5]
    frames = np.arange(n_frames)
    for k in range(5):  # consonants and pauses take the transition between neighbouring vowels
        known = ~np.isnan(formants[:, k])
        formants[:, k] = np.interp(frames, frames[known], formants[known, k])
    formants = uniform_filter1d(formants, 3, axis=0)  # ~50 ms formant transitions
    gates = table[:, 5:8]  # linear interpolation between frame centres softens onsets
    return formants, gates, table[:, 8], table[:, 9]


def glottal_source(rng, f0, voice, aspiration, speaker, session):
    """Sample-rate excitation: Rosenberg glottal-flow derivative with jitter/shimmer, plus breath noise."""
    phase = np.cumsum(f0) / SAMPLE_RATE
    jitter = 1 + speaker["jitter"] * rng.standard_normal(int(phase[-1]) + 2)
    phase = np.cumsum(f0 * jitter[phase.astype(int)]) / SAMPLE_RATE  # per-period F0 perturbation
    shimmer = 1 + speaker["shimmer"] * rng.standard_normal(int(phase[-1]) + 2)
    p, oq = phase % 1.0, session["open_quotient"]
    rise, fall = 0.65 * oq, 0.35 * oq
    flow = np.where(p < rise, 0.5 - 0.5 * np.cos(np.pi * p / rise),
                    np.where(p < oq, np.cos(0.5 * np.pi * (p - rise) / fall), 0.0))
    pulses = np.diff(flow, prepend=0.0) * shimmer[phase.astype(int)] * voice
    breath = (session["breathiness"] * voice * (0.3 + flow) + 0.5 * aspiration) * 0.05
    return pulses + breath * rng.standard_normal(f0.size)


def vocal_tract_log_gain(formants, bandwidths):
    """Natural-log magnitude of a cascade of 2-pole resonances (unit gain at DC), per frame."""
    f2 = FREQS ** 2
    log_peaks = np.sum(np.log(formants ** 2), axis=1, keepdims=True)
    denom = np.prod((formants[:, :, None] ** 2 - f2) ** 2 + (bandwidths[:, :, None] * FREQS) ** 2, axis=1)
    return log_peaks - 0.5 * np.log(denom)


def overlap_add_filter(excitation, noise, log_gain, fric_gain):
    """Time-varying filtering: Hann frames at 50 % overlap, one spectral envelope per frame.

    The vocal tract is made minimum phase (folded real cepstrum) so its ringing is causal, like a
    real resonator; the frication filter is zero phase, delayed 64 samples to stay inside the frame.
    """
    n_frames = log_gain.shape[0]
    window = np.hanning(WIN + 1)[:WIN]  # periodic Hann: shifted copies at hop WIN/2 sum to one
    frame = lambda x: np.lib.stride_tricks.sliding_window_view(  # noqa: E731
        np.pad(x, (0, n_frames * HOP + WIN - x.size)), WIN)[::HOP][:n_frames] * window
    fold = np.r_[1.0, np.full(NFFT // 2 - 1, 2.0), 1.0, np.zeros(NFFT // 2 - 1)]
    min_phase = np.exp(sp_fft.rfft(sp_fft.irfft(log_gain, NFFT) * fold, NFFT))
    delay = np.exp(-2j * np.pi * FREQS * 64 / SAMPLE_RATE)
    spectra = sp_fft.rfft(frame(excitation), NFFT) * min_phase + sp_fft.rfft(frame(noise), NFFT) * fric_gain * delay
    chunks = sp_fft.irfft(spectra, NFFT).reshape(n_frames, NFFT // HOP, HOP)
    out = np.zeros((n_frames + NFFT // HOP, HOP))
    for k in range(NFFT // HOP):
        out[k:k + n_frames] += chunks[:, k]
    return out.reshape(-1)[:excitation.size]


def synthesise_utterance(rng, n_samples, speaker, session):
    """One clean utterance of `n_samples` samples (float64, arbitrary scale)."""
    n_frames = n_samples // HOP + 2
    formants, gates, fric_centre, fric_width = draw_phones(rng, n_frames, speaker, session)
    centres = np.arange(n_frames) * HOP + WIN / 2
    t = np.arange(n_samples)
    contour = gaussian_filter1d(rng.standard_normal(n_frames), 12)  # ~200 ms intonation movements
    contour *= speaker["f0_range"] / (contour.std() + 1e-9)
    contour += np.linspace(0.5, -0.5, n_frames) * speaker["f0_range"]  # declination
    f0 = np.interp(t, centres, session["f0"] * np.exp(contour))
    voice, aspiration, frication = (np.interp(t, centres, g) for g in gates.T)
    excitation = glottal_source(rng, f0, voice, aspiration, speaker, session)
    noise = frication * rng.standard_normal(n_samples) * 0.02
    bandwidths = np.broadcast_to(BANDWIDTHS * speaker["bandwidth_scale"], formants.shape)
    log_gain = vocal_tract_log_gain(formants, bandwidths)
    fric_gain = np.exp(-0.5 * ((FREQS - fric_centre[:, None]) / fric_width[:, None]) ** 2)
    return overlap_add_filter(excitation, noise, log_gain, fric_gain)


def apply_channel(rng, speech, session):
    """Room reverb, microphone EQ and band limits, then coloured noise at the session's SNR."""
    n, rir = speech.size, session["rir"]
    size = sp_fft.next_fast_len(n + rir.size, real=True)  # one FFT size for linear convolution and filtering
    freqs = sp_fft.rfftfreq(size, 1 / SAMPLE_RATE)
    gain_db = np.interp(freqs, FREQS, channel_gain_db(FREQS, session))  # smooth: a coarse grid is enough
    response = sp_fft.rfft(rir, size) * 10 ** (gain_db / 20)
    wet = sp_fft.irfft(sp_fft.rfft(speech, size) * response, size)[:n]
    colour = (np.maximum(freqs, 50.0) / 1000.0) ** (session["noise_tilt"] / 20 * np.log2(10))
    white = rng.standard_normal(2 * freqs.size).view(np.complex128)  # white noise, drawn as a spectrum
    noise = sp_fft.irfft(white * colour, size)[:n]
    snr_db = session["snr_db"] + rng.normal(0.0, 2.0)
    noise *= np.sqrt(np.mean(wet ** 2) / np.mean(noise ** 2) * 10 ** (-snr_db / 10))
    noisy = wet + noise
    return noisy / np.max(np.abs(noisy)) * rng.uniform(0.3, 0.95)  # random recording level


def _write_session(task):
    """Synthesise and write every utterance of one video; returns the keys and sample count."""
    out_dir, seed, split, index, video, params = task
    speaker, session = draw_speaker(seed, split, index), draw_session(seed, split, index, video)
    spk = f"id{split}{index + 1:04d}"
    os.makedirs(os.path.join(out_dir, spk, session["video_id"]), exist_ok=True)
    keys, n_total = [], 0
    for utt in range(params["n_utterances"]):
        rng = _rng(seed, UTTERANCE, split, index, video, utt)
        n = int(rng.uniform(params["min_seconds"], params["max_seconds"]) * SAMPLE_RATE)
        wav = apply_channel(rng, synthesise_utterance(rng, n, speaker, session), session)
        key = f"{spk}/{session['video_id']}/{utt + 1:05d}.wav"
        sf.write(os.path.join(out_dir, key), wav, SAMPLE_RATE, subtype="PCM_16")
        keys.append(key)
        n_total += n
    return split, keys, n_total


def make_trials(seed, keys):
    """All cross-video same-speaker pairs (label 1) plus as many random different-speaker pairs."""
    rng = _rng(seed, TRIALS)
    keys = sorted(keys)
    spk = np.array([k.split("/")[0] for k in keys])
    video = np.array([k.split("/")[1] for k in keys])
    i, j = np.triu_indices(len(keys), 1)
    target = (spk[i] == spk[j]) & (video[i] != video[j])
    non_target = np.flatnonzero(spk[i] != spk[j])
    chosen = rng.choice(non_target, min(target.sum(), non_target.size), replace=False)
    pairs = [(1, i[t], j[t]) for t in np.flatnonzero(target)] + [(0, i[t], j[t]) for t in chosen]
    order = rng.permutation(len(pairs))
    return [f"{pairs[o][0]} {keys[pairs[o][1]]} {keys[pairs[o][2]]}" for o in order]


def make_demo_corpus(root="DB/demo", seed=1234, n_train_speakers=80, n_test_speakers=20,
                     n_videos=4, n_utterances=3, min_seconds=2.0, max_seconds=5.0,
                     workers=None, progress=True):
    """Build (or reuse) the demo corpus under `root` and return `root`.

    Reused when `root/demo_corpus.json` records the same parameters. Otherwise synthesised into a
    temporary sibling folder that replaces `root` only once complete (manifest written last), so an
    interrupted run never leaves a corpus that looks complete. A folder without the manifest is
    never overwritten.
    """
    params = dict(version=VERSION, seed=seed, n_train_speakers=n_train_speakers,
                  n_test_speakers=n_test_speakers, n_videos=n_videos, n_utterances=n_utterances,
                  min_seconds=min_seconds, max_seconds=max_seconds)
    manifest_path = os.path.join(root, MANIFEST)
    old_corpus = os.path.isfile(manifest_path)
    if old_corpus:
        with open(manifest_path) as f:
            if json.load(f).get("params") == params:
                return root
    elif os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise FileExistsError(f"{root} exists and is not a demo corpus ({MANIFEST} missing); not overwriting it")

    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo_corpus_tmp_", dir=parent)
    try:
        dirs = {TRAIN: os.path.join(tmp, "VoxCeleb2", "wav"), TEST: os.path.join(tmp, "VoxCeleb1", "eval_wav")}
        tasks = [(dirs[split], seed, split, index, video, params)
                 for split, n_speakers in ((TRAIN, n_train_speakers), (TEST, n_test_speakers))
                 for index in range(n_speakers) for video in range(n_videos)]
        n_workers = min(workers or os.cpu_count() or 1, len(tasks))
        keys, n_samples = {TRAIN: [], TEST: []}, 0
        bar = tqdm(total=len(tasks), desc="synthesising demo corpus", unit="video", disable=not progress)
        # fork: workers inherit this module even when it was imported by a script; they use no torch.
        pool = multiprocessing.get_context("fork").Pool(n_workers) if n_workers > 1 else nullcontext()
        with bar, pool:
            for split, session_keys, n in (pool.imap_unordered if n_workers > 1 else map)(_write_session, tasks):
                keys[split] += session_keys
                n_samples += n
                bar.update()
        trials = make_trials(seed, keys[TEST])
        with open(os.path.join(tmp, "VoxCeleb1", "veri_test.txt"), "w") as f:
            f.write("\n".join(trials) + "\n")
        counts = dict(train_speakers=n_train_speakers, train_utterances=len(keys[TRAIN]),
                      test_speakers=n_test_speakers, test_utterances=len(keys[TEST]), trials=len(trials),
                      target_trials=sum(t.startswith("1") for t in trials),
                      hours=round(n_samples / SAMPLE_RATE / 3600, 3))
        with open(os.path.join(tmp, MANIFEST), "w") as f:  # last: marks the corpus complete
            json.dump(dict(generator="demo_corpus.py", params=params, counts=counts), f, indent=1)
        if os.path.isdir(root):  # an older demo corpus (checked above) or an empty folder
            trash = tempfile.mkdtemp(prefix=".demo_corpus_old_", dir=parent)
            os.replace(root, os.path.join(trash, "corpus"))
            shutil.rmtree(trash)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def compute_eer(labels, scores):
    """Equal error rate (fraction), the original way: ROC, then the root of 1 - x - tpr(x)."""
    fpr, tpr, _ = roc_curve(labels, scores, pos_label=1)
    return brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0)


def mean_log_spectrum(wav, n_fft=512, hop=160):
    """Long-term average log-magnitude spectrum of a peak-normalised waveform (Hann, 512 points)."""
    wav = wav / np.max(np.abs(wav))
    frames = np.lib.stride_tricks.sliding_window_view(wav, n_fft)[::hop] * np.hanning(n_fft)
    return np.log(np.abs(np.fft.rfft(frames)) + 1e-8).mean(axis=0)


def naive_baseline_eer(root="DB/demo"):
    """EER of cosine similarity between mean log-magnitude spectra on `veri_test.txt` (fraction)."""
    with open(os.path.join(root, "VoxCeleb1", "veri_test.txt")) as f:
        trials = [line.split() for line in f if line.strip()]
    keys = sorted({key for _, a, b in trials for key in (a, b)})
    spectra = {key: mean_log_spectrum(sf.read(os.path.join(root, "VoxCeleb1", "eval_wav", key))[0])
               for key in keys}
    unit = {key: s / np.linalg.norm(s) for key, s in spectra.items()}
    scores = [float(unit[a] @ unit[b]) for _, a, b in trials]
    return compute_eer([int(label) for label, _, _ in trials], scores)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Synthesise the demo corpus and score its naive baseline.")
    parser.add_argument("-root", default="DB/demo", help="corpus folder (created, or reused if complete)")
    parser.add_argument("-seed", type=int, default=1234, help="random seed; same seed gives identical files")
    parser.add_argument("-n_train_speakers", type=int, default=80, help="speakers under VoxCeleb2/wav/")
    parser.add_argument("-n_test_speakers", type=int, default=20, help="speakers under VoxCeleb1/eval_wav/")
    parser.add_argument("-n_videos", type=int, default=3, help="sessions (videos) per speaker")
    parser.add_argument("-n_utterances", type=int, default=4, help="utterances per video")
    parser.add_argument("-min_seconds", type=float, default=2.0, help="shortest utterance in seconds")
    parser.add_argument("-max_seconds", type=float, default=5.0, help="longest utterance in seconds")
    parser.add_argument("-workers", type=int, default=None, help="worker processes (default: all cores)")
    return parser.parse_args(argv)


def main(args):
    root = make_demo_corpus(args.root, args.seed, args.n_train_speakers, args.n_test_speakers,
                            args.n_videos, args.n_utterances, args.min_seconds, args.max_seconds,
                            workers=args.workers)
    print(f"demo corpus in {root}; naive baseline (mean log-spectrum, cosine) EER: "
          f"{100 * naive_baseline_eer(root):.2f} %")


if __name__ == "__main__":
    main(parse_args())
