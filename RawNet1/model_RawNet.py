"""RawNet (RawNet1): the phase-1 and phase-2 networks, their losses, and the PyTorch VoxCeleb2 baseline.

Reproduces Jung et al., "RawNet: Advanced end-to-end deep neural network using raw waveforms for
text-independent speaker verification" (Interspeech 2019), whose code was Keras
(github.com/Jungjee/RawNet, folder python/RawNet1/Keras), plus that repository's simpler PyTorch
baseline trained on VoxCeleb2 (folder python/RawNet1/PyTorch).

The networks, bottom-up (channels of the paper; every LeakyReLU has slope 0.3, Keras' default):
    front-end   strided conv (128, k3, s3, valid) -> BN -> LeakyReLU
                -> residual blocks 1-2 (128 ch) and 3-6 (256 ch), each ending in max-pool 3
    phase 1     front-end -> one more 256-ch block -> 1x1 conv 256 -> BN -> LeakyReLU -> dropout 0.5
                -> global average pooling -> dense 128 -> BN -> LeakyReLU = embedding -> speaker basis
    phase 2     front-end -> GRU 1024 (recurrent dropout 0.3), last step
                -> dense 128 -> BN -> LeakyReLU = embedding -> speaker basis
    objective   softmax cross-entropy over embedding x speaker basis (no bias) + between-speaker loss
                + lambda * center loss
    baseline    (``-recipe vox2_baseline``) strided conv front-end with RawNet2's legacy residual blocks
                -> BN -> LeakyReLU -> GRU 1024, last step -> fc1_gru 1024 = embedding
                (training head: norm-10 scaling -> fc2_gru); cross-entropy only.

Initialisation follows the Keras code (``keras_init``): he_normal for every conv and dense kernel
(the speaker basis included), the GRU's own glorot_uniform / orthogonal kernels, zero biases, centers
uniform in [-0.05, 0.05]. The one deliberate difference from the Keras networks, the PyTorch form of
the GRU, is explained in RawNet1/README.md ("Deliberate differences").
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from model_RawNet2 import ResidualBlock as LegacyResidualBlock

LEAKY_SLOPE = 0.3  # Keras' LeakyReLU default alpha, kept by the authors in both codebases
BASIS_SCALE = 5.0  # s of the Keras speaker-basis layer: basis vectors rescaled to norm sqrt(s)
# Keras' truncated normal (he_normal) keeps samples within 2 standard deviations of the underlying
# normal; this is the standard deviation of the standard normal truncated to [-2, 2].
TRUNCATED_STD = 0.87962566103423978


def lrelu(x):
    return F.leaky_relu(x, LEAKY_SLOPE)


def keras_bn(channels):
    """BatchNorm with Keras' defaults: epsilon 1e-3 and moving-average momentum 0.99 (PyTorch counts
    momentum the other way round: 1 - 0.99)."""
    return nn.BatchNorm1d(channels, eps=1e-3, momentum=0.01)


# ---------------------------------------------------------------------------------------------
# Front-end shared by both phases

class ResBlock(nn.Module):
    """RawNet1 residual block: conv3 -> BN -> LeakyReLU -> conv3 -> BN (convs with Keras' 'same'
    padding), plus the shortcut (1x1 conv + BN when the channel count changes), add, LeakyReLU,
    max-pool 3 (Keras' default 'valid': a last incomplete window is dropped)."""

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
        return add_lrelu_max_pool3(out, identity)


class AddLReLUMaxPool3(torch.autograd.Function):
    """``F.max_pool1d(lrelu(a + b), 3)`` for training, in fewer passes over the full-rate tensors.

    LeakyReLU is strictly increasing, so the maximum of lrelu(s) over each window of 3 is lrelu of
    the maximum of s, taken at the same sample: the same value, bit for bit, with the LeakyReLU on
    a third of the samples. Only a 1-byte code (which of the 3 won, the first on ties as max-pool)
    and the pooled output are kept for backward instead of max-pool's int64 indices, and the
    gradient goes to the same sample as max-pool and LeakyReLU route it. (Two inputs whose
    LeakyReLU rounds to the same float while they differ are a tie for max-pool but not here; the
    gradient then goes to the larger one: a choice float rounding makes either way.)"""

    @staticmethod
    def forward(ctx, a, b):  # (B, C, T) twice -> (B, C, T // 3)
        s = a + b
        pooled = s.shape[-1] // 3
        x0, x1, x2 = (s[..., i:3 * pooled:3] for i in range(3))
        x01 = torch.maximum(x0, x1)
        value = F.leaky_relu_(torch.maximum(x01, x2), LEAKY_SLOPE)
        second = (x1 > x0).to(torch.uint8)
        third = (x2 > x01).to(torch.uint8)
        code = second + third * (2 - second)                          # 0, 1 or 2: the window's maximum
        ctx.save_for_backward(code, value)
        ctx.length = s.shape[-1]
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        code, value = ctx.saved_tensors
        batch, channels, pooled = grad.shape
        grad = torch.ops.aten.leaky_relu_backward(grad, value, LEAKY_SLOPE, False)  # value's sign is s's
        full = grad.new_zeros(batch, channels, ctx.length)            # samples past 3 * pooled get 0
        full[..., :3 * pooled].view(batch, channels, pooled, 3).scatter_(
            3, code.long().unsqueeze(3), grad.unsqueeze(3))
        return full, full


def add_lrelu_max_pool3(a, b):
    """``F.max_pool1d(lrelu(a + b), 3)``: the fused form when a gradient is needed (fewer passes over
    the full-rate tensors; bench/rawnet1_step.py times the training step with each), the plain one
    otherwise (no indices to keep)."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return AddLReLUMaxPool3.apply(a, b)
    return F.max_pool1d(lrelu(a + b), 3)


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
        # eval-mode layout: None runs forward_channels_last on CPU (a fixed rule: the faster layout
        # there, as bench/rawnet1_step.py measures) and the plain form elsewhere; True or False
        # forces one; not in the state dict
        self.channels_last = None

    def forward(self, x):  # (B, 1, T) -> (B, C, T')
        channels_last = self.channels_last if self.channels_last is not None else x.device.type == "cpu"
        if channels_last and not self.training:
            return self.forward_channels_last(x)
        return self.blocks(lrelu(self.first_bn(self.first_conv(x))))

    def forward_channels_last(self, x):
        """``forward`` in eval mode with the feature maps in channels-last layout, (B, C, 1, T)
        stored as (B, 1, T, C), where mkldnn's convolutions run faster (bench/rawnet1_step.py
        compares the two layouts): the strided conv as one
        matrix product over the input's frames of 3 samples, the blocks as 2-D convolutions and
        pools of height 1. The same arithmetic in another order (the outputs agree to about 1e-6
        relative). Returns a (B, C, T') view of channels-last memory."""
        batch, _, length = x.shape
        frames = x[:, 0, :length // 3 * 3].reshape(-1, 3)           # the conv's windows: stride 3, no overlap
        conv = self.first_conv
        y = torch.addmm(conv.bias, frames, conv.weight[:, 0].t())     # (B T', C)
        y = lrelu(_eval_bn(self.first_bn, y.view(batch, 1, length // 3, -1).permute(0, 3, 1, 2)))
        for block in self.blocks:
            out = lrelu(_eval_bn(block.bn1, _conv2d(block.conv1, y)))
            out = _eval_bn(block.bn2, _conv2d(block.conv2, out))
            identity = (_eval_bn(block.bn_shortcut, _conv2d(block.conv_shortcut, y))
                        if hasattr(block, "conv_shortcut") else y)
            y = F.max_pool2d(lrelu(out + identity), (1, 3))
        return y.squeeze(2)


def _conv2d(conv, x):  # an nn.Conv1d with 'same' padding on (B, C, 1, T)
    return F.conv2d(x, conv.weight.unsqueeze(2), conv.bias, padding=(0, conv.kernel_size[0] // 2))


def _eval_bn(bn, x):  # an nn.BatchNorm1d in eval mode on (B, C, 1, T)
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


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
        self.fc_out = nn.Linear(d_args["nb_code"], d_args["nb_classes"], bias=False)  # speaker basis

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
    """One-layer batch-first GRU with Keras' recurrent dropout (``implementation=1``): in training,
    three dropout masks per sequence, one per gate (reset, update, candidate), each fixed across time
    steps, multiply the previous state where it enters that gate's recurrent product; the state carried
    to the next step is not dropped. Without dropout (eval mode, or rate 0) this is plain ``nn.GRU``;
    the parameters keep ``nn.GRU``'s names and equations."""

    def __init__(self, input_size, hidden_size, recurrent_dropout=0.0):
        super().__init__(input_size, hidden_size, num_layers=1, batch_first=True)
        self.recurrent_dropout = recurrent_dropout

    def forward(self, x):  # (B, T, I) -> (B, T, H)
        if not self.training or self.recurrent_dropout == 0:
            return super().forward(x)[0]
        return self.unroll(x, self.draw_masks(x))

    def draw_masks(self, x):
        """Three independent inverted-dropout masks (3, B, H): values 0 or 1 / (1 - rate)."""
        keep = 1.0 - self.recurrent_dropout
        return torch.bernoulli(x.new_full((3, x.shape[0], self.hidden_size), keep)) / keep

    def unroll(self, x, masks):
        """The GRU recursion step by step; ``masks`` (3, B, H) multiply the previous state in the
        reset, update and candidate gates' recurrent products (PyTorch's equations:
        r, z = sigmoid(...), n = tanh(W_in x + b_in + r * (W_hn h + b_hn)))."""
        gates_x = F.linear(x, self.weight_ih_l0, self.bias_ih_l0)        # (B, T, 3H), all steps at once
        w_hr, w_hz, w_hn = self.weight_hh_l0.chunk(3, dim=0)
        b_hr, b_hz, b_hn = self.bias_hh_l0.chunk(3, dim=0)
        h = x.new_zeros(x.shape[0], self.hidden_size)
        outputs = []
        for t in range(x.shape[1]):
            x_r, x_z, x_n = gates_x[:, t].chunk(3, dim=1)
            r = torch.sigmoid(x_r + F.linear(h * masks[0], w_hr, b_hr))
            z = torch.sigmoid(x_z + F.linear(h * masks[1], w_hz, b_hz))
            n = torch.tanh(x_n + r * F.linear(h * masks[2], w_hn, b_hn))
            h = (1 - z) * n + z * h
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
        self.fc_out = nn.Linear(d_args["nb_code"], d_args["nb_classes"], bias=False)  # speaker basis

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


def keras_he_normal_(weight):
    """Keras 2.2's ``he_normal`` in place: a normal truncated to two standard deviations, scaled so the
    samples' standard deviation is sqrt(2 / fan_in). PyTorch's fan-in of a conv weight (out, in, k) or a
    linear weight (out, in) equals Keras' for its (k, in, out) or (in, out) kernel."""
    fan_in = weight[0].numel()
    std = math.sqrt(2.0 / fan_in) / TRUNCATED_STD
    return nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)


def keras_init(module):
    """The Keras code's initialisers, applied with ``model.apply``: he_normal for conv and dense kernels
    (strided conv, residual blocks, dense layers, speaker basis), zero biases; the GRU's own
    glorot_uniform input kernel, orthogonal recurrent kernel and zero biases; BatchNorm keeps gamma 1,
    beta 0."""
    if isinstance(module, (nn.Conv1d, nn.Linear)):
        keras_he_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GRU):
        for name, p in module.named_parameters():
            if name.startswith("weight_ih"):
                nn.init.xavier_uniform_(p)
            elif name.startswith("weight_hh"):
                nn.init.orthogonal_(p)
            else:
                nn.init.zeros_(p)


def keras_l2_groups(model, l2):
    """Adam parameter groups for Keras' ``kernel_regularizer=l2(l2)`` on every kernel: the loss term
    l2 * sum(w^2) has the gradient 2 * l2 * w, exactly Adam's coupled ``weight_decay = 2 * l2`` on the
    kernels (every tensor with more than one dimension); biases and BatchNorm parameters are not
    regularised."""
    named = list(model.named_parameters())
    return [{"params": [p for _, p in named if p.dim() > 1], "weight_decay": 2 * l2},
            {"params": [p for _, p in named if p.dim() <= 1], "weight_decay": 0.0}]


def keras_decay_scheduler(optimizer, decay, offset=0):
    """Keras' time-based decay, stepped after every optimiser step: update k (from 0) uses
    lr / (1 + decay * (k + offset))."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + decay * (step + offset)))


# Layers phase 2 takes from phase 1. The Keras code builds phase 2 with the same layer names as phase
# 1 only for the strided conv and the six residual blocks and loads phase 1 with
# ``load_weights(by_name=True)``; the BN after the strided conv, the dense embedding layer and its BN
# are unnamed (Keras numbers them on, so the names differ between the two models) and the speaker
# basis and centers are renamed, so those start from their initialisation.
PHASE2_INHERITED = ("frontend.first_conv.", "frontend.blocks.")


def init_from_pretrained(model, source_state, prefixes=PHASE2_INHERITED):
    """Copy the tensors of ``source_state`` whose names start with one of ``prefixes`` into ``model``
    (each must exist there with the same shape); everything else keeps its initialisation.
    Returns the (copied, kept) tensor names."""
    state = model.state_dict()
    copied = [name for name in state if name.startswith(prefixes)]
    for name in copied:
        if name not in source_state or source_state[name].shape != state[name].shape:
            raise ValueError(f"phase-1 state has no tensor {name} of shape {tuple(state[name].shape)}")
    state.update({name: source_state[name].clone() for name in copied})
    model.load_state_dict(state)
    return copied, [name for name in state if name not in copied]


# ---------------------------------------------------------------------------------------------
# Losses

def between_speaker_loss(weight, s=BASIS_SCALE):
    """The Keras code's between-speaker loss on the speaker basis (rows of ``weight``,
    (nb_classes, dim)): each basis vector w is rescaled to w / (|w| / sqrt(s) + 1e-4), norm just under
    sqrt(s), and the loss is the mean over all N x N entries of their Gram matrix with the diagonal
    zeroed, i.e. s * (sum of the off-diagonal cosines) / N^2."""
    w = weight / (weight.norm(dim=1, keepdim=True) / math.sqrt(s) + 1e-4)
    gram = w @ w.t()                                                  # (N, N)
    return (gram.sum() - gram.diagonal().sum()) / gram.numel()


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
        """One step of the rule above from the embeddings ``x`` (B, D) of a batch, in the centers' dtype."""
        x = x.to(self.centers.dtype)
        diff = torch.zeros_like(self.centers).index_add_(0, labels, self.centers[labels] - x)
        counts = x.new_zeros(len(self.centers)).index_add_(0, labels, x.new_ones(len(labels)))
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
