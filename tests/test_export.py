"""export_RawNet2.py: ONNX (checked with onnxruntime) and .pt2 (torch.export.load) against PyTorch."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import export_RawNet2
import tta
import utils
from common import DataError
from conftest import ROOT
from model_RawNet2 import RawNet2, load_pretrained

TINY = {"first_conv": 251, "in_channels": 1, "filts": [8, [8, 8], [8, 16], [16, 16]], "nb_fc_node": 16,
        "gru_node": 16, "nb_gru_layer": 1, "nb_samp": 4000, "nb_classes": 5}


@pytest.mark.slow  # a whole export
def test_random_legacy_weights_export_to_onnx_and_pt2_matching_pytorch(tmp_path, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = RawNet2(TINY, legacy=True)
    model.apply(utils.init_weights)
    for name, buffer in model.named_buffers():  # batch-norm statistics away from the identity
        if name.endswith("running_mean"):
            buffer.normal_(0, 0.1)
        elif name.endswith("running_var"):
            buffer.uniform_(0.5, 2.0)
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "legacy.pt")
    paths = export_RawNet2.main(export_RawNet2.build_parser().parse_args(
        ["-model_dir", str(tmp_path / "legacy.pt"), "-out", str(tmp_path / "x" / "net"),
         "-window_size", "1000"]))
    out = capsys.readouterr().out
    assert "check pt2: max |exported - PyTorch| / max |PyTorch| = 0.0e+00" in out
    assert "check onnx: max |exported - PyTorch|" in out
    reference = load_pretrained(str(tmp_path / "legacy.pt"))
    assert reference.legacy and type(reference) is RawNet2  # the plain network
    session = onnxruntime.InferenceSession(paths["onnx"], providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["nb_samp"] == "4000" and meta["layout"] == "legacy" and meta["window_size"] == "1000"
    program = torch.export.load(paths["pt2"]).module()
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 2, 5):  # the batch axis is dynamic
        x = torch.randn(batch, 4000, generator=generator)
        with torch.no_grad():
            ref = reference.embed(x).numpy()
            pt2 = program(x).numpy()
        onnx = session.run(None, {"waveform": x.numpy()})[0]
        assert onnx.shape == ref.shape == (batch, 16)
        assert np.max(np.abs(onnx - ref)) <= 1e-4 * np.max(np.abs(ref))
        assert np.max(np.abs(pt2 - ref)) <= 1e-6 * np.max(np.abs(ref))


def test_tta_embedding_is_the_mean_of_segment_embeddings():
    model = RawNet2(TINY).eval()
    model.apply(utils.init_weights)
    x = np.random.default_rng(0).uniform(-1, 1, 9500).astype(np.float32)
    with torch.no_grad():
        expected = model.embed(torch.from_numpy(utils.tta_segments(x, 4000, 1000))).mean(0).numpy()
        code = export_RawNet2.tta_embedding(lambda b: model.embed(torch.from_numpy(b)), x, 4000, 1000,
                                            segments_per_batch=2)
    np.testing.assert_allclose(code, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tta.embed_utterance(model, x, 1000), expected, rtol=1e-5, atol=1e-6)


def test_tta_embedding_runs_the_shared_tta_path_without_padding(monkeypatch):
    sizes, shared = [], tta.tta_embeddings
    monkeypatch.setattr(tta, "tta_embeddings", lambda *a, **k: sizes.append(k) or shared(*a, **k))
    x = np.random.default_rng(0).uniform(-1, 1, 9500).astype(np.float32)  # 3 segments
    batches = []
    export_RawNet2.tta_embedding(lambda b: batches.append(len(b)) or b[:, :2], x, 4000, 1000,
                                 segments_per_batch=2)
    assert sizes == [{"pad_last": False}] and batches == [2, 1]


def test_missing_optional_dependency_and_bad_checkpoint_are_one_line(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    script = os.path.join(ROOT, "export_RawNet2.py")
    proc = subprocess.run([sys.executable, script, "-model_dir", str(tmp_path / "bad.pt"), "-formats", "pt2"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"error: {tmp_path / 'bad.pt'}: checkpoint (-model_dir) is truncated")
    code = "import sys; sys.modules['onnxscript'] = None; sys.argv[1:] = ['-model_dir', 'x.pt']; " \
           f"exec(open({script!r}).read())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: -formats onnx needs onnx and onnxscript, which are not installed: "
                                   "pip install -r requirements-optional.txt")


def test_an_onnx_file_whose_window_size_is_not_a_number_is_one_line(tmp_path):
    pytest.importorskip("onnxruntime")
    helper = pytest.importorskip("onnx.helper")
    from onnx import TensorProto, save

    graph = helper.make_graph([helper.make_node("Identity", ["waveform"], ["embedding"])], "net",
                              [helper.make_tensor_value_info("waveform", TensorProto.FLOAT, ["batch", 100])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 100])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 8
    proto.metadata_props.add(key="window_size", value="wide")
    save(proto, str(tmp_path / "net.onnx"))
    with pytest.raises(DataError, match=r"net.onnx: its window_size metadata 'wide' is not a "
                                        r"whole number"):
        export_RawNet2.OnnxNetwork(str(tmp_path / "net.onnx"))


def test_a_file_that_is_not_onnx_is_one_line(tmp_path):
    pytest.importorskip("onnxruntime")
    (tmp_path / "net.onnx").write_bytes(b"PK\x03\x04 a zip, not a protobuf")
    with pytest.raises(DataError, match=r"net.onnx: not a loadable ONNX file"):
        export_RawNet2.OnnxNetwork(str(tmp_path / "net.onnx"))


@pytest.mark.parametrize("name, shape", [("input", ["batch", 100]), ("waveform", ["batch", "time"]),
                                         ("waveform", [100])])
def test_an_onnx_model_of_another_interface_is_one_line(tmp_path, name, shape):
    pytest.importorskip("onnxruntime")
    helper = pytest.importorskip("onnx.helper")
    from onnx import TensorProto, save

    graph = helper.make_graph([helper.make_node("Identity", [name], ["embedding"])], "net",
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, shape)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 8
    save(proto, str(tmp_path / "net.onnx"))
    with pytest.raises(DataError, match=r"net.onnx: not an export of export_RawNet2.py"):
        export_RawNet2.OnnxNetwork(str(tmp_path / "net.onnx"))


@pytest.mark.parametrize("opset", ["17", "999"])
def test_an_opset_torch_onnx_cannot_write_is_one_line(tmp_path, opset):
    pytest.importorskip("onnxscript")
    with pytest.raises(DataError, match=rf"-opset {opset}: must be from 18 "):
        export_RawNet2.main(export_RawNet2.build_parser().parse_args(
            ["-model_dir", str(tmp_path / "none.pt"), "-out", str(tmp_path / "net"), "-formats", "onnx",
             "-opset", opset]))
    assert not os.listdir(tmp_path)


def test_check_of_an_onnx_file_onnxruntime_cannot_load_is_one_line(tmp_path):
    pytest.importorskip("onnxruntime")
    (tmp_path / "net.onnx").write_bytes(b"\x08\x0b")  # a protobuf holding no graph
    net = export_RawNet2.EmbeddingNetwork(RawNet2(TINY).eval())
    with pytest.raises(DataError, match=r"net.onnx: not a loadable ONNX file"):
        export_RawNet2.check(net, {"onnx": str(tmp_path / "net.onnx")})
