"""Export the RawNet2 embedding network to ONNX and to torch.export (``.pt2``), from any checkpoint.

    python export_RawNet2.py -model_dir Pre-trained_model/rawnet2_best_weights.pt -out exported/rawnet2
    # -> exported/rawnet2.onnx and exported/rawnet2.pt2

The checkpoint is anything ``model_RawNet2.load_pretrained`` loads: the released weights (legacy
layout), a ``TA_*.pt`` state_dict or a ``last.pt`` of train_RawNet2.py (FMS layout). What is exported
is one batch of TTA segments to their embeddings, ``RawNet2.embed`` on the reference path
(``-fast False``: model_RawNet2.py alone) in eval mode:

    input  "waveform"   float32 (batch, nb_samp)      batch is dynamic; nb_samp is the checkpoint's
    output "embedding"  float32 (batch, nb_fc_node)   (59,049 and 1,024 for the paper's model)

The sinc filter bank depends only on the weights, so it is computed once and stored as a constant
(``FrozenSincConv``); every other layer is exported as it is. The ``.pt2`` is exported with
``torch.export.export(strict=True)``, which fails on any graph break, and the ONNX file is made from
that same exported program. Both are checked against PyTorch on random input (``-check``).

An utterance's embedding is the TTA recipe of evaluate_pretrained_RawNet2.py around this network:
    1. read 16 kHz mono audio as float64, divide by its peak |sample|, cast to float32
       (``utils.read_wav``; ``utils.read_audio`` converts other rates and channel counts);
    2. cut it into segments with ``utils.tta_segments(x, nb_samp, window_size)`` (window_size 11,810:
       consecutive segments overlap by that many samples, the last one is right-aligned, a short
       waveform is tiled to nb_samp);
    3. embed the segments (any batch size: in eval mode each segment is independent of the others)
       and take the mean of their embeddings.
``tta_embedding(run, waveform, nb_samp)`` does steps 2 and 3 for any ``run`` (an onnxruntime session's
``lambda x: session.run(None, {"waveform": x})[0]``, or ``torch.export.load(path).module()``).
``nb_samp`` and ``window_size`` are stored with the files (ONNX metadata; ``rawnet2.json`` in the .pt2).
"""

import argparse
import copy
import importlib.util
import json
import logging
import os
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import fast_RawNet2
import runs
import tta
import utils
from common import DataError

OPTIONAL = "pip install -r requirements-optional.txt"


class FrozenSincConv(nn.Module):
    """A ``SincConv`` whose filter bank is computed once from its current parameters (a buffer)."""

    def __init__(self, sinc):
        super().__init__()
        self.register_buffer("filters", sinc.filters().detach().clone())

    def forward(self, x):  # (B, 1, T) -> (B, C, T - kernel_size + 1)
        return F.conv1d(x, self.filters)


class EmbeddingNetwork(nn.Module):
    """``RawNet2.embed`` of a copy of ``model`` on the reference path, eval mode, frozen sinc filters."""

    def __init__(self, model):
        super().__init__()
        self.rawnet2 = fast_RawNet2.accelerate(copy.deepcopy(model), False).eval()  # the plain network
        self.rawnet2.first_conv = FrozenSincConv(model.first_conv)
        self.nb_samp = model.nb_samp
        self.requires_grad_(False)

    def forward(self, waveform):  # (B, nb_samp) -> (B, nb_fc_node)
        return self.rawnet2.embed(waveform)


class OnnxNetwork(nn.Module):
    """An exported ONNX file run by onnxruntime behind ``RawNet2.embed``'s interface, so that
    ``tta.iter_embeddings`` and ``tta.embed_utterance`` (evaluate_pretrained_RawNet2.py ``-onnx``)
    run it in place of the PyTorch network. CPU only."""

    def __init__(self, path):
        super().__init__()
        try:
            import onnxruntime
        except ImportError:
            raise DataError(f"-onnx needs onnxruntime, which is not installed: {OPTIONAL}") from None
        if not os.path.isfile(path):
            raise DataError(f"{path}: ONNX file not found (-onnx)")
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        try:
            self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        except (RuntimeError, ValueError, ort_errors.InvalidProtobuf, ort_errors.InvalidArgument,
                ort_errors.InvalidGraph, ort_errors.Fail) as e:  # onnxruntime's errors for unreadable files
            raise DataError(f"{path}: not a loadable ONNX file ({str(e).splitlines()[0]})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if not (len(inputs) == 1 and inputs[0].name == "waveform" and len(inputs[0].shape) == 2
                and isinstance(inputs[0].shape[1], int) and len(outputs) == 1 and len(outputs[0].shape) == 2):
            found = ", ".join(f"{i.name} {i.shape}" for i in inputs)
            raise DataError(f"{path}: not an export of export_RawNet2.py (expected one input waveform "
                            f"(batch, nb_samp) and one (batch, dim) output; its inputs: {found})")
        self.nb_samp = inputs[0].shape[1]
        meta = self.session.get_modelmeta().custom_metadata_map  # what main() stored (from a last.pt)
        try:
            self.checkpoint_args = {"window_size": int(meta["window_size"])} if "window_size" in meta else {}
        except ValueError:
            raise DataError(f"{path}: its window_size metadata {meta['window_size']!r} is not a whole "
                            f"number") from None

    def embed(self, x):  # (B, nb_samp) -> (B, dim), as RawNet2.embed
        batch = x.detach().cpu().numpy().astype(np.float32, copy=False)
        return torch.from_numpy(self.session.run(None, {"waveform": batch})[0])


def tta_embedding(run, waveform, nb_samp, window_size=utils.DEFAULT_WINDOW_SIZE, segments_per_batch=32):
    """TTA embedding of one peak-normalised float32 waveform with ``run`` ((n, nb_samp) float32 array ->
    (n, dim) array or tensor; or an exported module taking tensors): the mean of its segments'
    embeddings (``utils.tta_segments``, ``tta.tta_embeddings``; the last batch is not padded)."""
    segments = np.ascontiguousarray(utils.tta_segments(waveform, nb_samp, window_size), dtype=np.float32)

    def forward(batch):
        out = run(batch.numpy()) if not isinstance(run, nn.Module) else run(batch).detach()
        return torch.as_tensor(np.asarray(out, dtype=np.float32))
    with torch.no_grad():
        [(_, code)] = tta.tta_embeddings(forward, [(None, torch.from_numpy(segments))], segments_per_batch,
                                           pad_last=False)
    return code


def export_program(net, batch=2):
    """``torch.export`` of ``net`` with a dynamic batch axis; strict, so a graph break is an error."""
    example = torch.randn(batch, net.nb_samp)
    return torch.export.export(net, (example,), dynamic_shapes={"waveform": {0: torch.export.Dim("batch")}},
                               strict=True)


def save_pt2(program, path, meta):
    """The exported program, written atomically (an OSError is one line naming ``path``)."""
    extra = {"rawnet2.json": json.dumps(meta)}
    common.write_atomic(path, lambda f: torch.export.save(program, f, extra_files=extra))


# torch.onnx's exporter writes opset 18 or later: for an older one it logs a failed conversion and
# writes opset 18 all the same.
OLDEST_OPSET = 18


def save_onnx(program, path, meta, opset):
    """The exported program as ONNX (torch.onnx's exporter), with ``meta`` in its metadata, written
    atomically."""
    # torch.onnx logs a warning per torchvision operator it cannot register; none is used here. Its
    # logger has the name of a private torch module: no public switch silences these warnings alone
    # (the "torch.onnx" logger would hide its other warnings too). tests/test_layout.py fails if torch
    # renames that module.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=opset,
                                     input_names=["waveform"], output_names=["embedding"], verbose=False)
    proto = onnx_program.model_proto
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=str(value))
    common.write_atomic(path, lambda f: f.write(proto.SerializeToString()))  # what onnx.save writes


def relative_error(out, ref):
    """max |out - ref| / max |ref|."""
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


def check(net, paths, batches=(1, 3), seed=0):
    """Max relative error (``relative_error``) of each exported file against PyTorch, over random
    batches of the sizes in ``batches``; None for ONNX when onnxruntime is not installed."""
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(b, net.nb_samp, generator=generator) for b in batches]
    with torch.no_grad():
        refs = [net(x).numpy() for x in inputs]
    errors = {}
    if "pt2" in paths:
        module = torch.export.load(paths["pt2"]).module()
        with torch.no_grad():
            errors["pt2"] = max(relative_error(module(x), r) for x, r in zip(inputs, refs))
    if "onnx" in paths:
        if importlib.util.find_spec("onnxruntime") is None:
            errors["onnx"] = None
        else:
            session = OnnxNetwork(paths["onnx"]).session  # (a file onnxruntime cannot load: one line)
            errors["onnx"] = max(relative_error(session.run(None, {"waveform": x.numpy()})[0], r)
                                 for x, r in zip(inputs, refs))
    return errors


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = common.arg_group(parser, "export")
    add("model_dir", **common.MODEL_DIR_FLAG)
    add("out", type=str, default="exported/rawnet2", help="output path without extension: OUT.onnx, OUT.pt2")
    add("formats", type=str, nargs="+", default=["onnx", "pt2"], choices=["onnx", "pt2"],
        help="what to write: ONNX (needs onnx and onnxscript) and/or a torch.export program")
    add("opset", type=int, default=18, help="ONNX opset version")
    add("window_size", **common.CHECKPOINT_WINDOW_FLAG)  # stored with the files; the network ignores it
    add("m_first_conv", **common.CHECKPOINT_SINC_FLAG)
    add("check", default=True, help="compare the exported files with PyTorch on random input "
                                    "(ONNX through onnxruntime)", **common.BOOL_FLAG)
    return parser


def main(args):
    # a deprecation warning that torch.export raises inside its own (un)pickling of the program
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    if "onnx" in args.formats:
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise DataError(f"-formats onnx needs onnx and onnxscript, which are not installed: "
                            f"{OPTIONAL}") from None
        newest = onnx.defs.onnx_opset_version()
        if not OLDEST_OPSET <= args.opset <= newest:
            raise DataError(f"-opset {args.opset}: must be from {OLDEST_OPSET} (the oldest torch.onnx "
                            f"writes) to {newest} (the newest this onnx knows)")
    if args.m_first_conv is not None and args.m_first_conv < 1:
        raise DataError(f"-m_first_conv {args.m_first_conv}: must be at least 1")
    model = runs.load_network(args.model_dir, "checkpoint (-model_dir)",
                              {"first_conv": args.m_first_conv} if args.m_first_conv is not None else None)
    window_size = utils.resolve_window_size(args.window_size, model, args.model_dir)
    net = EmbeddingNetwork(model)
    meta = {"nb_samp": net.nb_samp, "window_size": window_size, "sample_rate": utils.SAMPLE_RATE,
            "embedding_dim": model.fc1_gru.out_features, "layout": "legacy" if model.legacy else "FMS"}
    program = export_program(net)
    paths = {}
    if "pt2" in args.formats:
        paths["pt2"] = args.out + ".pt2"
        save_pt2(program, paths["pt2"], meta)
    if "onnx" in args.formats:
        paths["onnx"] = args.out + ".onnx"
        save_onnx(program, paths["onnx"], meta, args.opset)
    for kind, path in paths.items():
        print(f"{path}: {kind}, input waveform (batch, {net.nb_samp}) float32 -> embedding "
              f"(batch, {meta['embedding_dim']})")
    if args.check:
        for kind, error in check(net, paths).items():
            if error is None:
                print(f"note: onnxruntime is not installed ({OPTIONAL}): {paths[kind]} not checked")
            else:
                print(f"check {kind}: max |exported - PyTorch| / max |PyTorch| = {error:.1e} "
                      f"(batches 1 and 3)")
    return paths


def cli(argv=None):
    """Command-line entry: bad input or a refused write ends in one line on stderr, exit 1."""
    common.run_cli(lambda: main(build_parser().parse_args(argv)))


if __name__ == "__main__":
    cli()
