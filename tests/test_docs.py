"""The Markdown files name code as `module.name` (or `Class.method`) in backticks: every such name of
this repository's modules must exist, so that a function moved or renamed leaves no stale pointer. The
README's "What is where" table lists every tracked top-level file and folder, and every file of docs/
and bench/, and nothing else."""

import ast
import glob
import importlib
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

DOCS = ["README.md", *sorted(glob.glob("docs/*.md", root_dir=ROOT)), "bench/README.md",
        "RawNet1/README.md", "DB/README.md"]
SCRIPT_FOLDERS = ("", "RawNet1", "DB", "bench")
# A dotted name not preceded by a path, flag or attribute character: `utils.read_wav(path)` gives
# ("utils", ".read_wav"); `tests/test_utils.py` gives nothing.
DOTTED = re.compile(r"(?<![\w./-])([A-Za-z_]\w*)((?:\.[A-Za-z_]\w*)+)")


def repository_modules():
    """Module name -> its folder, for every Python file of the repository outside tests/."""
    return {os.path.basename(path)[:-3]: os.path.dirname(path)
            for folder in SCRIPT_FOLDERS for path in glob.glob(os.path.join(ROOT, folder, "*.py"))}


def classes_of(modules):
    """Class name -> the modules that define it at top level."""
    classes = {}
    for name, folder in modules.items():
        with open(os.path.join(folder, name + ".py")) as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, []).append(name)
    return classes


def dotted_names(text):
    """Every `head.tail` written inside backticks in ``text``, file names (`x.py`) left out."""
    for span in re.findall(r"`([^`\n]+)`", text):
        for match in DOTTED.finditer(span):
            if match.group(2) != ".py":
                yield match.group(1), tuple(match.group(2)[1:].split("."))


def load(name, folder):
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def has_path(obj, attrs):
    for attr in attrs:
        if not hasattr(obj, attr):
            return False
        obj = getattr(obj, attr)
    return True


def exists(head, attrs, modules, classes):
    """Whether ``head.attrs`` names something: ``head`` a module of the repository, or a class that
    one of them defines (any of them, where several do). Names of other libraries count as found."""
    if head in modules:
        return has_path(load(head, modules[head]), attrs)
    if head in classes:
        return any(has_path(getattr(load(m, modules[m]), head), attrs) for m in classes[head])
    return True


def test_a_dotted_name_is_checked_against_the_module_or_class():
    modules = repository_modules()
    classes = classes_of(modules)
    found = {f"{h}.{'.'.join(a)}": exists(h, a, modules, classes)
             for h, a in dotted_names("`utils.read_wav(p)`, `utils.no_such`, `RawNet2.embed`, "
                                      "`RawNet2.no_such`, `torch.no_such`, `tests/test_utils.py`, `tta.py`")}
    assert found == {"utils.read_wav": True, "utils.no_such": False, "RawNet2.embed": True,
                     "RawNet2.no_such": False, "torch.no_such": True}


@pytest.mark.parametrize("doc", DOCS)
def test_every_dotted_name_in_the_docs_exists(doc):
    modules = repository_modules()
    classes = classes_of(modules)
    with open(os.path.join(ROOT, doc)) as f:
        names = set(dotted_names(f.read()))
    stale = sorted(f"{h}.{'.'.join(a)}" for h, a in names if not exists(h, a, modules, classes))
    assert not stale, f"{doc} names what does not exist: {', '.join(stale)}"


def what_is_where(readme):
    """The paths in backticks in the first column of the first table under "## What is where"."""
    section = readme.split("\n## What is where\n", 1)[1].split("\n## ", 1)[0]
    rows = section[section.index("\n|"):].split("\n\n", 1)[0].strip().splitlines()[2:]
    return {path for row in rows for path in re.findall(r"`([^`]+)`", row.split("|")[1])}


def entries_to_list(tracked):
    """Top-level entries of ``tracked`` (folders with a trailing slash), and the files of docs/ and bench/."""
    top = {p.split("/")[0] + "/" if "/" in p else p for p in tracked}
    return top | {p for p in tracked if p.split("/")[0] in ("docs", "bench")}


def test_entries_to_list_are_top_level_entries_and_docs_and_bench_files():
    tracked = ["README.md", ".ci/run", "tests/test_docs.py", "docs/FIDELITY.md", "bench/README.md"]
    assert entries_to_list(tracked) == {"README.md", ".ci/", "tests/", "docs/", "docs/FIDELITY.md", "bench/",
                                        "bench/README.md"}


def test_what_is_where_lists_every_tracked_entry_and_only_what_exists():
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    with open(os.path.join(ROOT, "README.md")) as f:
        listed = what_is_where(f.read())
    assert sorted(entries_to_list(tracked) - listed) == [], "tracked but not in README's What is where"
    assert sorted(p for p in listed if not os.path.exists(os.path.join(ROOT, p))) == [], \
        "in README's What is where but not in the repository"
