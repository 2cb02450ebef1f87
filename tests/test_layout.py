"""What editors of the code rely on: functions short enough to read whole, ruff run on every tracked
Python file, and the private numpy and torch names the code has to use still where it uses them."""

import ast
import collections
import importlib.util
import io
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

import scoring
from conftest import ROOT

MAX_FUNCTION_LINES = 90


def tracked_python_files():
    """The Python files git tracks, relative to the repository root; skips outside a git checkout."""
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    proc = subprocess.run([git, "ls-files", "-z", "*.py"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"not a git checkout: {proc.stderr.strip()}")
    return sorted(path for path in proc.stdout.split("\0") if path)


def test_every_function_outside_tests_is_at_most_90_lines():
    long = []
    for path in tracked_python_files():
        if path.startswith("tests/"):
            continue
        with open(os.path.join(ROOT, path)) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines, to split: {', '.join(long)}"


def ruff():
    """The command that runs ruff; skips where it is not installed."""
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    if shutil.which("ruff") is None:
        pytest.skip("ruff is not installed (pip install ruff, the version ruff.toml names)")
    return [shutil.which("ruff")]


def test_ruff_checks_every_tracked_python_file():
    tracked = tracked_python_files()
    proc = subprocess.run([*ruff(), "check", ".", "--show-files"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    root = os.path.realpath(ROOT)
    checked = {os.path.relpath(os.path.realpath(line), root) for line in proc.stdout.splitlines()}
    missing = [path for path in tracked if path not in checked]
    assert not missing, f"tracked Python files `ruff check .` leaves out (ruff.toml): {', '.join(missing)}"


# --- private names of numpy and torch that the code uses -----------------------------------------


def pickle_globals(obj, protocol):
    """(module, name) of every global that a pickle of ``obj`` names."""
    named = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            named.add((module, name))
            return super().find_class(module, name)

    Recording(io.BytesIO(pickle.dumps(obj, protocol=protocol))).load()
    return named


def test_numpy_pickles_arrays_through_exactly_the_globals_scoring_admits():
    """scoring imports numpy's private ``_reconstruct`` and admits the globals of _PICKLE_GLOBALS, plus
    the latin-1 byte encoder of protocols 0-2: the names numpy's pickles give must be those."""
    embeddings = {"id10001/vid/00001": np.arange(4, dtype=np.float32), "scalar": np.float32(1),
                  "ordered": collections.OrderedDict(fortran=np.ones((2, 2), order="F"))}
    named = set().union(*(pickle_globals(embeddings, protocol) for protocol in range(6)))
    assert named == scoring._PICKLE_GLOBALS | {("_codecs", "encode")}
    assert np.empty(0).__reduce__()[0] is scoring._reconstruct  # the function that arrays pickle call


def getlogger_arguments(path):
    """The first argument of each logging.getLogger call in ``path`` (ast nodes)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    return [node.args[0] for node in ast.walk(tree)
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "logging.getLogger" and node.args]


def test_the_torch_logger_that_export_silences_is_a_module_of_torch_logging_by_its_name():
    if any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxscript")):
        pytest.skip("no ONNX export here: onnx and onnxscript are not installed")
    names = [arg.value for arg in getlogger_arguments(os.path.join(ROOT, "export_RawNet2.py"))
             if isinstance(arg, ast.Constant) and str(arg.value).startswith("torch.")]
    assert names, "export_RawNet2.py silences no torch logger any more: this test has nothing to check"
    for name in names:
        try:
            spec = importlib.util.find_spec(name)  # (imports the packages above it, not the module)
        except ModuleNotFoundError:  # (a package above it is gone)
            spec = None
        assert spec is not None, f"torch has no module {name} any more: export_RawNet2.py silences nothing"
        uses = getlogger_arguments(spec.origin)
        assert any(isinstance(arg, ast.Name) and arg.id == "__name__" for arg in uses), (
            f"torch's {name} no longer logs through logging.getLogger(__name__)")
