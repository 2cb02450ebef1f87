"""RawNet2: raw-waveform speaker embedding network.

Reproduces Jung et al., "Improved RawNet with Feature Map Scaling for Text-independent Speaker
Verification using Raw Waveforms" (Interspeech 2020), after the authors' PyTorch code
(github.com/Jungjee/RawNet, folder python/RawNet2). docs/FIDELITY.md lists what it keeps from
that code, its quirks, and where it knowingly differs; each quirk is also commented where it lives.

The network, bottom-up:
    LayerNorm(nb_samp) -> SincConv(128, 251) -> |.| -> max-pool 3 -> BN -> LeakyReLU(0.3)
    -> 6 residual blocks, each ending in max-pool 3 and feature map scaling (FMS)
    -> BN -> LeakyReLU(0.3) -> GRU(1024), last step -> fc1_gru = the speaker embedding
    (training head: embedding scaled to norm 10 -> fc2_gru logits).

Two state-dict layouts, both loading with strict key matching:
  * FMS layout (``legacy=False``): the authors' training code; FMS lives in each block as ``frm.fc``.
  * Legacy layout (``legacy=True``): the released ``rawnet2_best_weights.pt``; FMS is applied by the
    top-level ``fc_attention0..5``, and each block feeds ``conv1`` its raw input (see ResidualBlock).

``embed(x)`` is the plain embedding entry point (``forward(x, is_test=True)`` stays for the original
scripts). This file is the whole network and knows nothing else: fast_RawNet2.py (the scripts'
``-fast``) subclasses it to run three of its stages (``sinc_front_end``, ``residual_stack``,
``gru_outputs``) with the same math in another order; ``-fast False`` runs exactly this code.
"""

import math
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LEAKY_SLOPE = 0.3  # Keras' LeakyReLU default, kept by the authors ("lrelu_keras")


class LayerNorm(nn.Module):
    """Layer norm over the time axis, as in the original: *unbiased* std, eps added to the std.

    ``gamma``/``beta`` have one value per sample, so the network only accepts inputs of exactly
    ``nb_samp`` samples.
    """

    def __init__(self, features, eps=1e-6):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(features))
        self.beta = nn.Parameter(torch.zeros(features))
        self.eps = eps

    def forward(self, x):  # (B, T) -> (B, T)
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)  # unbiased (N - 1), deliberately: original code
        return self.gamma * (x - mean) / (std + self.eps) + self.beta


def mel_spaced_band_edges(nb_filters, sample_rate=16000, min_low_hz=50, min_band_hz=50):
    """``nb_filters + 1`` edges equally spaced on the mel scale from 30 Hz to sr/2 - 100 Hz."""
    def to_mel(hz):
        return 2595 * np.log10(1 + hz / 700)
    def to_hz(mel):
        return 700 * (10 ** (mel / 2595) - 1)
    low_hz = 30  # the original's value (SincNet uses 30 too), not min_low_hz
    high_hz = sample_rate / 2 - (min_low_hz + min_band_hz)
    return to_hz(np.linspace(to_mel(low_hz), to_mel(high_hz), nb_filters + 1))


class SincConv(nn.Module):
    """SincNet band-pass filter bank (Ravanelli & Bengio 2018) as in RawNet2's ``SincConv_fast``.

    Learnable: the low cut-off ``low_hz_`` and the bandwidth ``band_hz_`` of each filter.
    """

    def __init__(self, out_channels, kernel_size, sample_rate=16000, in_channels=1,
                 min_low_hz=50, min_band_hz=50):
        super().__init__()
        if in_channels != 1:
            raise ValueError(f"SincConv only supports in_channels=1, got {in_channels}")
        if kernel_size % 2 == 0:
            kernel_size += 1  # the original forces an odd, symmetric filter
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.sample_rate = sample_rate
        self.min_low_hz = min_low_hz
        self.min_band_hz = min_band_hz

        edges = mel_spaced_band_edges(out_channels, sample_rate, min_low_hz, min_band_hz)
        self.low_hz_ = nn.Parameter(torch.tensor(edges[:-1], dtype=torch.float32).view(-1, 1))
        self.band_hz_ = nn.Parameter(torch.tensor(np.diff(edges), dtype=torch.float32).view(-1, 1))

        half = kernel_size // 2
        # Quirk kept on purpose: the half window is sampled at `half` points from 0 to
        # kernel_size/2 - 1 (= 124.5 for 251 taps), so its spacing is slightly more than 1.
        n_lin = torch.linspace(0, kernel_size / 2 - 1, steps=int(kernel_size / 2))
        self.register_buffer("window_", 0.54 - 0.46 * torch.cos(2 * math.pi * n_lin / kernel_size),
                             persistent=False)
        # 2*pi*t/sr for the left half, t = -half .. -1 samples
        self.register_buffer("n_", 2 * math.pi * torch.arange(-half, 0).view(1, -1) / sample_rate,
                             persistent=False)

    def filters(self):
        """The (out_channels, 1, kernel_size) filter bank of the current parameters."""
        low = self.min_low_hz + torch.abs(self.low_hz_)
        high = torch.clamp(low + self.min_band_hz + torch.abs(self.band_hz_),
                           self.min_low_hz, self.sample_rate / 2)
        band = (high - low)[:, 0]
        # (sin(2 pi f_high t) - sin(2 pi f_low t)) / (pi t), left half only, then windowed
        left = (torch.sin(high @ self.n_) - torch.sin(low @ self.n_)) / (self.n_ / 2) * self.window_
        center = 2 * band.view(-1, 1)
        band_pass = torch.cat([left, center, torch.flip(left, dims=[1])], dim=1)
        band_pass = band_pass / (2 * band[:, None])
        return band_pass.view(self.out_channels, 1, self.kernel_size)

    def forward(self, x):  # (B, 1, T) -> (B, C, T - kernel_size + 1)
        return F.conv1d(x, self.filters())


def feature_map_scaling(x, fc):
    """FMS, the paper's best variant: s = sigmoid(fc(mean_t x)); return x * s + s."""
    s = torch.sigmoid(fc(x.mean(-1))).unsqueeze(-1)  # (B, C, 1)
    return x * s + s


class FMS(nn.Module):
    """Feature map scaling inside a block (FMS layout: key ``blockN.0.frm.fc``)."""

    def __init__(self, nb_dim):
        super().__init__()
        self.fc = nn.Linear(nb_dim, nb_dim)

    def forward(self, x):  # (B, C, T) -> (B, C, T)
        return feature_map_scaling(x, self.fc)


class ResidualBlock(nn.Module):
    """Pre-activation residual block with max-pool 3 (and FMS in the FMS layout).

    ``legacy=True`` reproduces the released weights' block: ``bn1`` + LeakyReLU are computed (so
    ``bn1``'s running statistics update in training) but ``conv1`` is fed the block's *raw input*.
    This quirk changes the embeddings; it is needed to reproduce the released model.
    """

    def __init__(self, nb_filts, first=False, legacy=False):
        super().__init__()
        in_ch, out_ch = nb_filts
        self.first = first
        self.legacy = legacy
        if not first:
            self.bn1 = nn.BatchNorm1d(in_ch)
        self.conv1 = nn.Conv1d(in_ch, out_ch, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm1d(out_ch)
        self.conv2 = nn.Conv1d(out_ch, out_ch, kernel_size=3, padding=1)
        if in_ch != out_ch:
            self.conv_downsample = nn.Conv1d(in_ch, out_ch, kernel_size=1)
        if not legacy:
            self.frm = FMS(out_ch)

    def forward(self, x):  # (B, C_in, T) -> (B, C_out, T // 3)
        out = x
        if not self.first and (self.training or not self.legacy):
            out = F.leaky_relu(self.bn1(x), LEAKY_SLOPE)
        if self.legacy:
            out = x  # the released model's quirk: conv1 sees the raw input
        out = self.conv1(out)
        out = self.conv2(F.leaky_relu(self.bn2(out), LEAKY_SLOPE))
        identity = self.conv_downsample(x) if hasattr(self, "conv_downsample") else x
        out = F.max_pool1d(out + identity, 3)
        return out if self.legacy else self.frm(out)


class RawNet2(nn.Module):
    """RawNet2. ``d_args`` is the original scripts' model dict: ``first_conv``, ``in_channels``,
    ``filts`` (e.g. ``[128, [128, 128], [128, 256], [256, 256]]``), ``nb_fc_node``, ``gru_node``,
    ``nb_gru_layer``, ``nb_samp``, ``nb_classes``. It is read, never modified.
    """

    NB_BLOCKS = 6
    LEAKY_SLOPE = LEAKY_SLOPE

    def __init__(self, d_args, legacy=False):
        super().__init__()
        self.legacy = legacy
        self.nb_samp = d_args["nb_samp"]
        filts = d_args["filts"]
        first_filts, block_filts = filts[0], self.block_filters(filts)

        self.ln = LayerNorm(self.nb_samp)
        self.first_conv = SincConv(first_filts, d_args["first_conv"], in_channels=d_args["in_channels"])
        self.first_bn = nn.BatchNorm1d(first_filts)
        for i, nb_filts in enumerate(block_filts):
            block = ResidualBlock(nb_filts, first=(i == 0), legacy=legacy)
            setattr(self, f"block{i}", nn.Sequential(block))
        if legacy:
            for i, (_, out_ch) in enumerate(block_filts):
                setattr(self, f"fc_attention{i}", nn.Sequential(nn.Linear(out_ch, out_ch)))
        last_ch = block_filts[-1][1]
        self.bn_before_gru = nn.BatchNorm1d(last_ch)
        self.gru = nn.GRU(input_size=last_ch, hidden_size=d_args["gru_node"],
                          num_layers=d_args["nb_gru_layer"], batch_first=True)
        self.fc1_gru = nn.Linear(d_args["gru_node"], d_args["nb_fc_node"])
        self.fc2_gru = nn.Linear(d_args["nb_fc_node"], d_args["nb_classes"])

    @staticmethod
    def block_filters(filts):
        """(in, out) channels of block0..5: filts[1] twice, filts[2], then filts[2][1] -> filts[2][1]
        three times (what the original gets by overwriting d_args['filts'][2][0])."""
        last = filts[2][1]
        return [tuple(filts[1]), tuple(filts[1]), tuple(filts[2])] + [(last, last)] * 3

    def embed(self, x):  # (B, nb_samp) -> (B, nb_fc_node)
        """The speaker embedding (before the training head's scaling)."""
        if x.dim() != 2 or x.shape[-1] != self.nb_samp:
            raise ValueError(f"RawNet2 expects (batch, {self.nb_samp}) waveforms, got {tuple(x.shape)}")
        x = self.ln(x).unsqueeze(1)                                   # (B, 1, T)
        # The sinc front end stays float32 under autocast: bf16 rounds its filters (computed by a
        # matmul) and its output by ~1-2 %, which first_bn (large mean, small spread) amplifies.
        with torch.autocast(x.device.type, enabled=False):
            x = self.sinc_front_end(x.to(self.ln.gamma.dtype))       # sinc -> |.| -> max-pool 3
        x = F.leaky_relu(self.first_bn(x), LEAKY_SLOPE)
        x = self.residual_stack(x)                                    # block0..5
        x = F.leaky_relu(self.bn_before_gru(x), LEAKY_SLOPE)
        x = self.gru_outputs(x.transpose(1, 2))                       # (B, T_gru, gru_node)
        return self.fc1_gru(x[:, -1, :])                              # last time step

    # The three stages of embed (fast_RawNet2.FastRawNet2 overrides them with the same math).

    def sinc_front_end(self, x):  # (B, 1, T) -> (B, C, (T - K + 1) // 3)
        return F.max_pool1d(torch.abs(self.first_conv(x)), 3)

    def residual_stack(self, x):  # (B, C, T) -> (B, C', T // 3 ** 6)
        for i in range(self.NB_BLOCKS):
            x = getattr(self, f"block{i}")(x)
            if self.legacy:
                x = feature_map_scaling(x, getattr(self, f"fc_attention{i}"))
        return x

    def gru_outputs(self, x):  # (B, T, C) -> (B, T, gru_node)
        self.gru.flatten_parameters()
        bf16 = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
        if x.is_cuda and bf16:
            # CUDA autocast runs cuDNN's RNNs in float16 whatever its dtype, and cuDNN has no bfloat16
            # RNN: under bfloat16 autocast the GRU runs in float32, as cuDNN's float32 GRU
            with torch.autocast("cuda", enabled=False):
                return self.gru(x.float())[0]
        return self.gru(x)[0]

    def forward(self, x, is_test=False):
        """Training-head logits, or the un-normalised embedding when ``is_test`` (original API)."""
        code = self.embed(x)
        if is_test:
            return code
        # Training head: scale the embedding to L2 norm 10 before the classifier (original code).
        code = code / (code.norm(p=2, dim=1, keepdim=True) / 10.0)
        return self.fc2_gru(code)


# ---------------------------------------------------------------------------------------------
# Loading checkpoints

def default_d_args(nb_classes=6112, nb_samp=59049):
    """The paper's model configuration (the original's ``-m_*`` defaults)."""
    return {"first_conv": 251, "in_channels": 1, "filts": [128, [128, 128], [128, 256], [256, 256]],
            "nb_fc_node": 1024, "gru_node": 1024, "nb_gru_layer": 1,
            "nb_samp": nb_samp, "nb_classes": nb_classes}


def strip_module_prefix(state_dict):
    """Drop the ``module.`` prefix that nn.DataParallel / DDP add to every key."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return OrderedDict((k[len("module."):], v) for k, v in state_dict.items())
    return state_dict


def d_args_from_state_dict(state_dict):
    """Recover the model configuration from tensor shapes (the paper's layout of blocks)."""
    sd = state_dict
    try:
        return {
            "first_conv": 251,  # not stored in a state dict; the paper's value
            "in_channels": 1,
            "filts": [sd["first_conv.low_hz_"].shape[0],
                      [sd["block0.0.conv1.weight"].shape[1], sd["block0.0.conv1.weight"].shape[0]],
                      [sd["block2.0.conv1.weight"].shape[1], sd["block2.0.conv1.weight"].shape[0]],
                      [sd["block3.0.conv1.weight"].shape[1], sd["block3.0.conv1.weight"].shape[0]]],
            "nb_fc_node": sd["fc1_gru.weight"].shape[0],
            "gru_node": sd["gru.weight_hh_l0"].shape[1],
            "nb_gru_layer": sum(1 for k in sd if k.startswith("gru.weight_hh_l")),
            "nb_samp": sd["ln.gamma"].shape[0],
            "nb_classes": sd["fc2_gru.weight"].shape[0],
        }
    except KeyError as e:
        raise KeyError(f"not a RawNet2 checkpoint: key {e.args[0]!r} is missing") from None


def load_pretrained(path, map_location="cpu", d_args=None):
    """Load a RawNet2 checkpoint file and return the model in eval mode (``torch.load`` with
    ``weights_only=True``, then ``model_from_checkpoint``).

    Accepts a plain state_dict (the released ``rawnet2_best_weights.pt`` or the original trainer's
    ``TA_*.pt``), one with a ``module.`` prefix, or a checkpoint dict written by our trainer (with a
    ``"model"`` entry, whose ``"d_args"`` entry then gives the configuration). The sinc kernel size
    is not stored in a plain state dict: pass ``d_args`` (e.g. ``{"first_conv": 501}``) when it is
    not the paper's 251.
    """
    return model_from_checkpoint(torch.load(path, map_location=map_location, weights_only=True), path,
                                 d_args)


def min_nb_samp(first_conv):
    """Shortest input the network takes: the sinc filter (odd length, as SincConv makes it) and seven
    max-pools of 3 (the front end's and the six blocks') must leave at least one GRU step."""
    return (first_conv | 1) - 1 + 3 ** 7


def model_from_checkpoint(obj, path, d_args=None):
    """The RawNet2 of ``obj``, a checkpoint already loaded from the file ``path`` (see
    ``load_pretrained``), in eval mode.

    The layout (legacy vs FMS) is detected from the keys; ``nb_samp`` and ``nb_classes`` are read
    from the ``ln.gamma`` and ``fc2_gru.weight`` shapes. ``d_args`` entries override the
    configuration read from the file; a checkpoint that records its configuration refuses ``d_args``
    that contradict it. ``model.checkpoint_args`` holds the training flags a checkpoint dict records
    ({} for a plain state_dict).
    Raises ``ValueError`` (one line naming ``path`` and the offending keys) for anything else: another
    layout, shapes that do not fit, NaN or infinite weights.
    """
    recorded, checkpoint_args = None, {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        recorded, checkpoint_args = obj.get("d_args"), obj.get("args")
        if recorded is not None and not isinstance(recorded, dict):
            raise ValueError(f"{path}: its d_args entry is a {type(recorded).__name__}, not a dict")
        checkpoint_args = checkpoint_args if isinstance(checkpoint_args, dict) else {}
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise ValueError(f"{path}: not a state_dict (expected a dict of tensor names to tensors)")
    state_dict = strip_module_prefix(obj)
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: NaN or infinite weights in {len(bad)} tensors ({', '.join(bad[:3])}"
                         f"{' ...' if len(bad) > 3 else ''})")
    legacy = "fc_attention0.0.weight" in state_dict
    try:
        config = dict(recorded) if recorded is not None else d_args_from_state_dict(state_dict)
    except KeyError as e:
        raise ValueError(f"{path}: {e.args[0]}") from None
    for key, value in (d_args or {}).items():
        if recorded is not None and key in recorded and recorded[key] != value:
            raise ValueError(f"{path}: {key} {value} given, but this checkpoint was trained with "
                             f"{key} {recorded[key]} (its d_args)")
        config[key] = value
    config["nb_samp"] = state_dict["ln.gamma"].shape[0]
    config["nb_classes"] = state_dict["fc2_gru.weight"].shape[0]
    if config["nb_samp"] < min_nb_samp(config["first_conv"]):
        raise ValueError(f"{path}: a sinc filter of first_conv {config['first_conv']} taps needs segments of "
                         f"at least {min_nb_samp(config['first_conv'])} samples, its are {config['nb_samp']}")
    try:
        model = RawNet2(config, legacy=legacy)
    except Exception as e:  # inconsistent shapes that no RawNet2 configuration can hold
        raise ValueError(f"{path}: cannot build RawNet2 from these tensor shapes ({e})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        layout = "legacy" if legacy else "FMS"
        raise ValueError(f"{path}: does not match the RawNet2 {layout} layout; "
                         f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    bad = [k for k in expected if expected[k].shape != state_dict[k].shape]
    if bad:
        shapes = ", ".join(f"{k} {tuple(state_dict[k].shape)} in the file, {tuple(expected[k].shape)} "
                           f"expected" for k in bad[:3])
        raise ValueError(f"{path}: tensor shapes do not fit the configuration {config}: {shapes}")
    model.load_state_dict(state_dict, strict=True)
    model.checkpoint_args = checkpoint_args
    return model.eval()
