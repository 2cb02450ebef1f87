"""RawNet (RawNet1): the phase-1 and phase-2 networks, their losses, and the PyTorch VoxCeleb2 baseline.

Reproduces Jung et al., "RawNet: Advanced end-to-end deep neural network using raw waveforms for
text-independent speaker verification" (Interspeech 2019), whose code was Keras
(github.com/Jungjee/RawNet, folder Keras), plus that repository's simpler PyTorch baseline trained on
VoxCeleb2. The facts followed are in ../../shared/SPEC.md, section 2.

The networks, bottom-up (channels of the paper; every LeakyReLU has slope 0.3, Keras' default):
    front-end   strided conv (128, k3, s3, valid) -> BN -> LeakyReLU
                -> residual blocks 1-2 (128 ch) and 3-6 (256 ch), each ending in max-pool 3
    phase 1     front-end -> one more 256-ch block -> 1x1 conv 256 -> BN -> LeakyReLU -> dropout 0.5
                -> global average pooling -> dense 128 -> BN -> LeakyReLU = embedding -> dense softmax
    phase 2     front-end -> GRU 1024 (recurrent dropout 0.3), last step
                -> dense 128 -> BN -> LeakyReLU = embedding -> dense softmax
    objective   softmax cross-entropy + between-speaker loss + lambda * center loss
    baseline    (``-recipe vox2_baseline``) strided conv front-end with RawNet2's legacy residual blocks
                -> BN -> LeakyReLU -> GRU 1024, last step -> fc1_gru 1024 = embedding
                (training head: norm-10 scaling -> fc2_gru); cross-entropy only.

Deliberate differences from the original Keras code (and why):
  * The GRU follows PyTorch's equations (reset gate applied after the recurrent product, sigmoid gates)
    instead of Keras 2's defaults (reset before the product, hard-sigmoid gates): the cuDNN-compatible
    form, and the one our loaders and tests can check against ``nn.GRU``. Recurrent dropout is Keras'
    (one mask per sequence on the recurrent input), see ``DropoutGRU``.
  * Initialisation: the SPEC is silent, so the phase-1/2 networks use Keras' defaults (Glorot-uniform
    kernels, zero biases, orthogonal recurrent kernel; centers uniform in [-0.05, 0.05]); the PyTorch
    baseline uses the PyTorch RawNet code's rule (``utils.init_weights``).
  * At test time the network sees the whole utterance in one forward (both phases accept any length
    of at least ``min_samples``), as the Keras model did; there is no segment averaging.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from model_RawNet2 import ResidualBlock as LegacyResidualBlock

LEAKY_SLOPE = 0.3  # Keras' LeakyReLU default alpha, kept by the authors in both codebases


def lrelu(x):
    return F.leaky_relu(x, LEAKY_SLOPE)


def keras_bn(channels):
    """BatchNorm with Keras' defaults: epsilon 1e-3 and moving-average momentum 0.99 (PyTorch counts
    momentum the other way round: 1 - 0.99)."""
    return nn.BatchNorm1d(channels, eps=1e-3, momentum=0.01)


# ---------------------------------------------------------------------------------------------
# Front-end shared by both phases

class ResBlock(nn.Module):
    """RawNet1 residual block: conv3 -> BN -> LeakyReLU -> conv3 -> BN, plus the shortcut (1x1 conv +
    BN when the channel count changes), add, LeakyReLU, max-pool 3 (Keras 'same' padding)."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.conv1 = nn.Conv1d(in_ch, out_ch, kernel_size=3, padding=1)
        self.bn1 = keras_bn(out_ch)
        self.conv2 = nn.Conv1d(out_ch, out_ch, kernel_size=3, padding=1)
        self.bn2 = keras_bn(out_ch)
        if in_ch != out_ch:
            self.conv_shortcut = nn.Conv1d(in_ch, out_ch, kernel_size=1)
            self.bn_shortcut = keras_bn(out_ch)

    def forward(self, x):  # (B, C_in, T) -> (B, C_out, T // 3)
        out = lrelu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = self.bn_shortcut(self.conv_shortcut(x)) if hasattr(self, "conv_shortcut") else x
        return F.max_pool1d(lrelu(out + identity), 3)


class FrontEnd(nn.Module):
    """Strided conv (kernel 3, stride 3, no padding) -> BN -> LeakyReLU -> residual blocks.

    ``filts = [first conv, stage 1, stage 2]`` channels, ``nb_blocks = [stage 1, stage 2]`` blocks
    (paper: [128, 128, 256] and [2, 4]). Input (B, 1, T) -> (B, filts[2], T // 3 ** (1 + blocks)).
    """

    def __init__(self, filts, nb_blocks):
        super().__init__()
        self.first_conv = nn.Conv1d(1, filts[0], kernel_size=3, stride=3)
        self.first_bn = keras_bn(filts[0])
        channels = [filts[0]] + [filts[1]] * nb_blocks[0] + [filts[2]] * nb_blocks[1]
        self.blocks = nn.Sequential(*[ResBlock(i, o) for i, o in zip(channels[:-1], channels[1:])])

    def forward(self, x):  # (B, 1, T) -> (B, C, T')
        return self.blocks(lrelu(self.first_bn(self.first_conv(x))))


def check_input(x, min_samples):
    if x.dim() != 2 or x.shape[-1] < min_samples:
        raise ValueError(f"expected (batch, samples >= {min_samples}) waveforms, got {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------
# Phase 1 and phase 2

class RawNetPretrain(nn.Module):
    """Phase 1 (pre-training): front-end, one more block, 1x1 conv, global average pooling, dense
    embedding. ``forward`` returns (embedding, logits)."""

    def __init__(self, d_args):
        super().__init__()
        filts, nb_blocks = d_args["filts"], d_args["nb_blocks"]
        self.min_samples = self.min_length(nb_blocks)
        self.frontend = FrontEnd(filts, nb_blocks)
        self.pre_block = ResBlock(filts[2], filts[2])
        self.pre_conv = nn.Conv1d(filts[2], filts[2], kernel_size=1)
        self.pre_bn = keras_bn(filts[2])
        self.dropout = nn.Dropout(d_args["dropout"])
        self.fc_code = nn.Linear(filts[2], d_args["nb_code"])
        self.bn_code = keras_bn(d_args["nb_code"])
        self.fc_out = nn.Linear(d_args["nb_code"], d_args["nb_classes"])

    @staticmethod
    def min_length(nb_blocks):
        """Shortest input: the strided conv and 1 + sum(nb_blocks) max-pools leave one frame."""
        return 3 ** (2 + sum(nb_blocks))

    def embed(self, x):  # (B, T) -> (B, nb_code)
        check_input(x, self.min_samples)
        x = self.pre_block(self.frontend(x.unsqueeze(1)))             # (B, C, T // 3 ** 8)
        x = self.dropout(lrelu(self.pre_bn(self.pre_conv(x))))
        x = x.mean(-1)                                                # global average pooling, (B, C)
        return lrelu(self.bn_code(self.fc_code(x)))

    def forward(self, x):
        code = self.embed(x)
        return code, self.fc_out(code)

    @property
    def speaker_weights(self):  # (nb_classes, nb_code): one weight vector per training speaker
        return self.fc_out.weight


class DropoutGRU(nn.GRU):
    """One-layer batch-first GRU with Keras' recurrent dropout: in training, one dropout mask per
    sequence (fixed across time steps) multiplies the previous state *where it enters the recurrent
    product*; the state carried to the next step is not dropped. Without dropout (eval mode, or rate 0)
    this is plain ``nn.GRU``; the parameters keep ``nn.GRU``'s names and equations."""

    def __init__(self, input_size, hidden_size, recurrent_dropout=0.0):
        super().__init__(input_size, hidden_size, num_layers=1, batch_first=True)
        self.recurrent_dropout = recurrent_dropout

    def forward(self, x):  # (B, T, I) -> (B, T, H)
        if not self.training or self.recurrent_dropout == 0:
            return super().forward(x)[0]
        keep = 1.0 - self.recurrent_dropout
        mask = torch.bernoulli(x.new_full((x.shape[0], self.hidden_size), keep)) / keep
        return self.unroll(x, mask)

    def unroll(self, x, mask):
        """The GRU recursion step by step, the previous state multiplied by ``mask`` (B, H) in the
        recurrent product (PyTorch's equations: r, z = sigmoid, n = tanh(W_in x + r * (W_hn h)))."""
        gates_x = F.linear(x, self.weight_ih_l0, self.bias_ih_l0)        # (B, T, 3H), all steps at once
        h = x.new_zeros(x.shape[0], self.hidden_size)
        outputs = []
        for t in range(x.shape[1]):
            gates_h = F.linear(h * mask, self.weight_hh_l0, self.bias_hh_l0)  # (B, 3H)
            x_r, x_z, x_n = gates_x[:, t].chunk(3, dim=1)
            h_r, h_z, h_n = gates_h.chunk(3, dim=1)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            h = (1 - z) * torch.tanh(x_n + r * h_n) + z * h
            outputs.append(h)
        return torch.stack(outputs, dim=1)


class RawNet(nn.Module):
    """Phase 2: front-end, GRU (last step), dense embedding. ``forward`` returns (embedding, logits)."""

    def __init__(self, d_args):
        super().__init__()
        filts, nb_blocks = d_args["filts"], d_args["nb_blocks"]
        self.min_samples = self.min_length(nb_blocks)
        self.frontend = FrontEnd(filts, nb_blocks)
        self.gru = DropoutGRU(filts[2], d_args["gru_node"], d_args["gru_dropout"])
        self.fc_code = nn.Linear(d_args["gru_node"], d_args["nb_code"])
        self.bn_code = keras_bn(d_args["nb_code"])
        self.fc_out = nn.Linear(d_args["nb_code"], d_args["nb_classes"])

    @staticmethod
    def min_length(nb_blocks):
        """Shortest input: the strided conv and sum(nb_blocks) max-pools leave one GRU step."""
        return 3 ** (1 + sum(nb_blocks))

    def embed(self, x):  # (B, T) -> (B, nb_code)
        check_input(x, self.min_samples)
        x = self.frontend(x.unsqueeze(1))                             # (B, C, T // 3 ** 7)
        x = self.gru(x.transpose(1, 2))[:, -1]                        # last step, (B, gru_node)
        return lrelu(self.bn_code(self.fc_code(x)))

    def forward(self, x):
        code = self.embed(x)
        return code, self.fc_out(code)

    @property
    def speaker_weights(self):  # (nb_classes, nb_code): one weight vector per training speaker
        return self.fc_out.weight


def keras_init(module):
    """Keras' default initialisers, applied with ``model.apply``: Glorot-uniform kernels (conv, dense,
    GRU input kernel), orthogonal GRU recurrent kernel, zero biases; BatchNorm keeps gamma 1, beta 0.
    (PyTorch's fans for a conv weight (out, in, k) equal Keras' for its (k, in, out) kernel.)"""
    if isinstance(module, (nn.Conv1d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GRU):
        for name, p in module.named_parameters():
            if name.startswith("weight_ih"):
                nn.init.xavier_uniform_(p)
            elif name.startswith("weight_hh"):
                nn.init.orthogonal_(p)
            else:
                nn.init.zeros_(p)


def init_from_pretrained(model, source_state):
    """Copy, layer by layer, the tensors of every layer of ``model`` whose tensors all appear in
    ``source_state`` with the same names and shapes (Keras' ``load_weights(by_name=True)``); other
    layers keep their initialisation. Returns the (copied, kept) tensor names."""
    state = model.state_dict()
    layers = {}
    for name in state:
        layers.setdefault(name.rsplit(".", 1)[0], []).append(name)
    copied = [name for names in layers.values()
              if all(n in source_state and source_state[n].shape == state[n].shape for n in names)
              for name in names]
    state.update({name: source_state[name].clone() for name in copied})
    model.load_state_dict(state)
    return copied, [name for name in state if name not in copied]


# ---------------------------------------------------------------------------------------------
# Losses

def between_speaker_loss(weight):
    """Mean off-diagonal cosine similarity of the speaker weight vectors (rows of ``weight``,
    (nb_classes, dim)): pushes the speakers' basis vectors apart."""
    w = F.normalize(weight, dim=1)
    similarity = w @ w.t()                                            # (N, N), ones on the diagonal
    n = weight.shape[0]
    return (similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1))


class CenterLoss(nn.Module):
    """Center loss (Wen et al., ECCV 2016): L_C = 1/2 * sum_i ||x_i - c_{y_i}||^2 over the mini-batch.

    Centers are not trained by gradient; ``update`` applies Wen et al.'s rule with rate ``alpha``
    (0.5 in RawNet): for each class j in the batch, delta_j = sum_{i: y_i = j} (c_j - x_i) / (1 + n_j),
    c_j <- c_j - alpha * delta_j.
    """

    def __init__(self, nb_classes, dim, alpha=0.5):
        super().__init__()
        self.alpha = alpha
        # Keras' 'uniform' initialiser of the original center layer: U(-0.05, 0.05).
        self.register_buffer("centers", torch.empty(nb_classes, dim).uniform_(-0.05, 0.05))

    def forward(self, x, labels):  # (B, D), (B,) -> scalar
        return 0.5 * (x - self.centers[labels]).pow(2).sum()

    @torch.no_grad()
    def update(self, x, labels):
        diff = torch.zeros_like(self.centers).index_add_(0, labels, self.centers[labels] - x)
        counts = torch.zeros(len(self.centers), device=x.device).index_add_(0, labels, torch.ones_like(labels, dtype=x.dtype))
        self.centers -= self.alpha * diff / (1 + counts[:, None])


# ---------------------------------------------------------------------------------------------
# The PyTorch VoxCeleb2 baseline (-recipe vox2_baseline)

class RawNetBaseline(nn.Module):
    """The PyTorch RawNet baseline trained on VoxCeleb2 with cross-entropy only (original attribute
    names: ``first_conv``, ``first_bn``, ``block0`` (2 blocks), ``block1`` (4 blocks),
    ``bn_before_gru``, ``gru``, ``fc1_gru``, ``fc2_gru``). Its blocks are RawNet2's legacy blocks
    without feature-map scaling: ``bn1`` is computed but ``conv1`` is fed the block's raw input (the
    quirk lives in ``model_RawNet2.ResidualBlock``). PyTorch BatchNorm defaults, as in that code."""

    def __init__(self, d_args):
        super().__init__()
        filts, nb_blocks = d_args["filts"], d_args["nb_blocks"]
        self.min_samples = self.min_length(nb_blocks)
        self.first_conv = nn.Conv1d(1, filts[0], kernel_size=3, stride=3)
        self.first_bn = nn.BatchNorm1d(filts[0])
        stage0 = [(filts[1], filts[1])] * nb_blocks[0]
        stage1 = [(filts[1], filts[2])] + [(filts[2], filts[2])] * (nb_blocks[1] - 1)
        self.block0 = nn.Sequential(*[LegacyResidualBlock(c, first=(i == 0), legacy=True)
                                      for i, c in enumerate(stage0)])
        self.block1 = nn.Sequential(*[LegacyResidualBlock(c, legacy=True) for c in stage1])
        self.bn_before_gru = nn.BatchNorm1d(filts[2])
        self.gru = nn.GRU(filts[2], d_args["gru_node"], num_layers=1, batch_first=True)
        self.fc1_gru = nn.Linear(d_args["gru_node"], d_args["nb_code"])
        self.fc2_gru = nn.Linear(d_args["nb_code"], d_args["nb_classes"])

    min_length = staticmethod(RawNet.min_length)

    def embed(self, x):  # (B, T) -> (B, nb_code)
        check_input(x, self.min_samples)
        x = lrelu(self.first_bn(self.first_conv(x.unsqueeze(1))))     # (B, C, T // 3)
        x = self.block1(self.block0(x))                               # (B, C', T // 3 ** 7)
        x = lrelu(self.bn_before_gru(x))
        self.gru.flatten_parameters()
        x, _ = self.gru(x.transpose(1, 2))                            # (B, T', gru_node)
        return self.fc1_gru(x[:, -1])

    def forward(self, x):
        code = self.embed(x)
        # Training head of the PyTorch code: the embedding scaled to L2 norm 10 before the classifier.
        return code, self.fc2_gru(code / (code.norm(p=2, dim=1, keepdim=True) / 10.0))

    @property
    def speaker_weights(self):  # (nb_classes, nb_code): one weight vector per training speaker
        return self.fc2_gru.weight
