"""RawNet2 network: sizes, sinc filters, layer norm, FMS, both checkpoint layouts, loading."""


import numpy as np
import pytest
import torch

from model_RawNet2 import (
    FMS,
    LayerNorm,
    RawNet2,
    SincConv,
    default_d_args,
    feature_map_scaling,
    load_pretrained,
)


def small_args(nb_classes=5, nb_samp=4000):
    return {"first_conv": 251, "in_channels": 1, "filts": [8, [8, 8], [8, 16], [16, 16]],
            "nb_fc_node": 16, "gru_node": 16, "nb_gru_layer": 1, "nb_samp": nb_samp,
            "nb_classes": nb_classes}


@pytest.mark.parametrize("nb_classes,expected", [(6112, 13_379_378), (5994, 13_258_428)])
@pytest.mark.parametrize("legacy", [False, True])
def test_parameter_counts_match_the_original(nb_classes, expected, legacy):
    model = RawNet2(default_d_args(nb_classes), legacy=legacy)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_time_lengths_match_the_original():
    model = RawNet2(default_d_args(10)).eval()
    lengths = []
    def hook(module, inp, out):
        lengths.append(out.shape[-1])
    model.first_conv.register_forward_hook(hook)
    model.first_bn.register_forward_hook(hook)  # after |.| and max-pool 3
    for i in range(6):
        getattr(model, f"block{i}").register_forward_hook(hook)
    model.gru.register_forward_hook(lambda m, i, out: lengths.append(out[0].shape[1]))
    with torch.no_grad():
        code = model.embed(torch.randn(1, 59049))
    # sinc conv, front-end max-pool, block0..5 (each ends in max-pool 3), GRU steps
    assert lengths == [58_799, 19_599, 6_533, 2_177, 725, 241, 80, 26, 26]
    assert code.shape == (1, 1024)


def test_constructor_does_not_mutate_d_args():
    d_args = default_d_args(10)
    before = repr(d_args)
    RawNet2(d_args)
    RawNet2(d_args, legacy=True)
    assert repr(d_args) == before


def reference_sinc_filters(low_hz_, band_hz_, kernel=251, sr=16000):
    """The original code's sinc filter formula in float64 numpy, written out independently of the module."""
    low = 50 + np.abs(low_hz_)
    high = np.clip(low + 50 + np.abs(band_hz_), 50, sr / 2)
    band = high - low
    half = kernel // 2
    t = np.arange(-half, 0)  # -125 .. -1 samples
    k = np.arange(half) * 124.5 / 124  # 125 points from 0 to 124.5 inclusive (the quirk)
    window = 0.54 - 0.46 * np.cos(2 * np.pi * k / kernel)
    filters = []
    for lo, hi, b in zip(low, high, band):
        left = (np.sin(2 * np.pi * hi * t / sr) - np.sin(2 * np.pi * lo * t / sr)) / (np.pi * t / sr) * window
        full = np.concatenate([left, [2 * b], left[::-1]])
        filters.append(full / (2 * b))
    return np.array(filters)


def test_sinc_init_is_mel_spaced_from_30_to_7900_hz():
    conv = SincConv(128, 251)
    def mel(hz):
        return 2595 * np.log10(1 + hz / 700)
    edges = np.concatenate([conv.low_hz_.detach().numpy()[:, 0],
                            [conv.low_hz_[-1, 0].item() + conv.band_hz_[-1, 0].item()]])
    assert edges[0] == pytest.approx(30, abs=1e-4)
    assert edges[-1] == pytest.approx(7900, rel=1e-6)
    np.testing.assert_allclose(np.diff(mel(edges)), (mel(7900) - mel(30)) / 128, rtol=1e-4)
    np.testing.assert_allclose(conv.band_hz_.detach().numpy()[:, 0], np.diff(edges), rtol=1e-5)


def test_sinc_filters_equal_closed_form():
    conv = SincConv(128, 251)
    with torch.no_grad():  # move away from the init, including a negative value (|.| in the formula)
        conv.low_hz_.add_(torch.linspace(-100, 300, 128).view(-1, 1))
        conv.band_hz_.mul_(-1.3)
    expected = reference_sinc_filters(conv.low_hz_.detach().double().numpy()[:, 0],
                                      conv.band_hz_.detach().double().numpy()[:, 0])
    got = conv.filters().detach().numpy()[:, 0, :]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert got.shape == (128, 251)


def test_sinc_filter_passes_its_band():
    conv = SincConv(16, 251)
    filters = conv.filters().detach().double().numpy()[:, 0, :]
    response = np.abs(np.fft.rfft(filters, 8192, axis=1))
    freqs = np.fft.rfftfreq(8192, 1 / 16000)
    low = 50 + conv.low_hz_.detach().numpy()[:, 0]
    high = low + 50 + conv.band_hz_.detach().numpy()[:, 0]
    peak = freqs[response.argmax(1)]
    assert np.all((peak >= low - 60) & (peak <= high + 60))


def test_layer_norm_uses_unbiased_std_plus_eps():
    x = torch.randn(3, 50, dtype=torch.float64) * 4 + 2
    ln = LayerNorm(50).double()
    with torch.no_grad():
        ln.gamma.uniform_(0.5, 2)
        ln.beta.uniform_(-1, 1)
    xn = x.numpy()
    std = np.std(xn, axis=1, ddof=1, keepdims=True)  # N - 1
    expected = (ln.gamma.detach().numpy() * (xn - xn.mean(1, keepdims=True)) / (std + 1e-6)
                + ln.beta.detach().numpy())
    np.testing.assert_allclose(ln(x).detach().numpy(), expected, rtol=1e-12)
    # eps is added to the std, not the variance: a constant input maps to beta exactly
    const = torch.full((1, 50), 3.0, dtype=torch.float64)
    np.testing.assert_allclose(ln(const).detach().numpy()[0], ln.beta.detach().numpy())


def test_feature_map_scaling_is_x_times_s_plus_s():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7)
    fms = FMS(4)
    w, b = fms.fc.weight.detach().numpy(), fms.fc.bias.detach().numpy()
    xn = x.numpy()
    s = 1 / (1 + np.exp(-(xn.mean(-1) @ w.T + b)))
    expected = xn * s[:, :, None] + s[:, :, None]
    np.testing.assert_allclose(fms(x).detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feature_map_scaling(x, fms.fc).detach().numpy(), expected,
                               rtol=1e-5, atol=1e-6)


def expected_keys(legacy, nb_blocks=6):
    """The key set of the original checkpoints (both layouts), written out by hand."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = {"ln.gamma", "ln.beta", "first_conv.low_hz_", "first_conv.band_hz_",
            "gru.weight_ih_l0", "gru.weight_hh_l0", "gru.bias_ih_l0", "gru.bias_hh_l0",
            "fc1_gru.weight", "fc1_gru.bias", "fc2_gru.weight", "fc2_gru.bias"}
    keys |= {f"{m}.{p}" for m in ("first_bn", "bn_before_gru") for p in bn}
    for i in range(nb_blocks):
        block = f"block{i}.0"
        mods = ["conv1", "conv2"] + (["conv_downsample"] if i == 2 else [])
        keys |= {f"{block}.{m}.{p}" for m in mods for p in ("weight", "bias")}
        keys |= {f"{block}.bn2.{p}" for p in bn}
        if i > 0:
            keys |= {f"{block}.bn1.{p}" for p in bn}
        if legacy:
            keys |= {f"fc_attention{i}.0.weight", f"fc_attention{i}.0.bias"}
        else:
            keys |= {f"{block}.frm.fc.weight", f"{block}.frm.fc.bias"}
    return keys


@pytest.mark.parametrize("legacy", [False, True])
def test_state_dict_keys_match_the_original(legacy):
    assert set(RawNet2(default_d_args(10), legacy=legacy).state_dict()) == expected_keys(legacy)


def perturb_bn1(model):
    with torch.no_grad():
        for i in range(1, 6):
            bn = getattr(model, f"block{i}")[0].bn1
            bn.weight.mul_(3.0)
            bn.bias.add_(1.0)
            bn.running_mean.add_(0.5)


@pytest.mark.parametrize("legacy,bn1_matters", [(True, False), (False, True)])
def test_bn1_affects_output_only_in_fms_layout(legacy, bn1_matters):
    torch.manual_seed(0)
    model = RawNet2(small_args(), legacy=legacy).eval()
    x = torch.randn(2, 4000)
    with torch.no_grad():
        before = model.embed(x)
        perturb_bn1(model)
        after = model.embed(x)
    assert (not torch.allclose(before, after)) == bn1_matters


def test_legacy_bn1_statistics_still_update_in_training():
    model = RawNet2(small_args(), legacy=True).train()
    before = model.block1[0].bn1.running_mean.clone()
    model(torch.randn(3, 4000))
    assert not torch.equal(before, model.block1[0].bn1.running_mean)


def test_training_head_normalises_embedding_to_norm_10():
    torch.manual_seed(0)
    model = RawNet2(small_args()).eval()
    x = torch.randn(2, 4000)
    with torch.no_grad():
        code = model(x, is_test=True)
        logits = model(x)
        scaled = code / code.norm(dim=1, keepdim=True) * 10
        expected = scaled @ model.fc2_gru.weight.T + model.fc2_gru.bias
    assert torch.equal(code, model.embed(x))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_wrong_input_length_is_a_clear_error():
    model = RawNet2(small_args())
    with pytest.raises(ValueError, match=r"\(batch, 4000\)"):
        model.embed(torch.randn(1, 3999))


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("wrap", ["plain", "module", "checkpoint"])
def test_load_pretrained_round_trip(tmp_path, legacy, wrap):
    torch.manual_seed(0)
    model = RawNet2(small_args(nb_classes=7), legacy=legacy).eval()
    state = model.state_dict()
    if wrap == "module":
        state = {"module." + k: v for k, v in state.items()}
    elif wrap == "checkpoint":
        state = {"model": state, "epoch": 3, "d_args": small_args(nb_classes=7)}
    torch.save(state, tmp_path / "w.pt")
    loaded = load_pretrained(tmp_path / "w.pt")
    assert loaded.legacy == legacy and not loaded.training
    assert loaded.nb_samp == 4000 and loaded.fc2_gru.out_features == 7
    x = torch.randn(2, 4000)
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(x), model.embed(x))


def test_load_pretrained_rejects_foreign_file_in_one_line(tmp_path):
    state = RawNet2(small_args()).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["block3.0.frm.fc.bias"]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as err:
        load_pretrained(tmp_path / "bad.pt")
    message = str(err.value)
    assert "\n" not in message and "bad.pt" in message
    assert "block3.0.frm.fc.bias" in message and "extra.weight" in message


def test_load_pretrained_rejects_non_rawnet_file(tmp_path):
    torch.save({"foo": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt"):
        load_pretrained(tmp_path / "other.pt")


def test_sinc_front_end_stays_float32_under_bf16_autocast():
    torch.manual_seed(0)
    model = RawNet2(small_args()).eval()
    dtypes = []
    model.first_conv.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    x = torch.randn(2, 4000)
    with torch.no_grad():
        reference = model.embed(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model.embed(x).float()
    assert dtypes == [torch.float32, torch.float32]
    assert torch.nn.functional.cosine_similarity(mixed, reference).min() > 0.98
