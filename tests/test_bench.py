"""The benchmark scripts (bench/) are not run by the tests (they take minutes), but every name they
use from the project's modules must exist: a function moved between modules breaks a benchmark
silently otherwise."""

import ast
import glob
import os

import pytest

import common
import distributed
import fast_RawNet2
import runs
import scoring
import tta
import utils
from conftest import ROOT

MODULES = {"common": common, "distributed": distributed, "fast_RawNet2": fast_RawNet2, "runs": runs,
           "scoring": scoring, "tta": tta, "utils": utils}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "bench", "*.py"))),
                         ids=os.path.basename)
def test_bench_scripts_use_only_names_that_exist(path):
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    used = {(node.value.id, node.attr) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id in MODULES}
    missing = sorted(f"{m}.{a}" for m, a in used if not hasattr(MODULES[m], a))
    assert not missing, f"{os.path.basename(path)} uses {', '.join(missing)}"
