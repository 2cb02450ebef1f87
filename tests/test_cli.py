"""The scripts' one error trap (common.run_cli), their shared flags and their one checkpoint loader."""

import importlib
import os
import subprocess
import sys

import pytest

import common
import evaluate_pretrained_RawNet2 as evaluate
import export_RawNet2 as export
import train_RawNet2 as train
from common import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def raising(error):
    def main(*args, **kwargs):
        raise error
    return main


@pytest.mark.parametrize("module", [evaluate, export])
def test_a_bug_in_a_script_keeps_its_traceback(monkeypatch, module):
    monkeypatch.setattr(module, "main", raising(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        module.cli([])


@pytest.mark.parametrize("error,line", [
    (DataError("x.txt:3: expected a number"), "error: x.txt:3: expected a number"),
    (PermissionError(13, "Permission denied", "out/a.pk"), "error: out/a.pk: Permission denied"),
    (common.OutputError("a.pk: not written (No space left on device)"),
     "error: a.pk: not written (No space left on device)"),
])
def test_a_user_mistake_is_one_error_line_and_exit_1(error, line):
    with pytest.raises(SystemExit) as exit_:
        common.run_cli(raising(error))
    assert exit_.value.code == line


def test_an_os_error_without_a_file_is_a_bug():
    with pytest.raises(OSError, match="no file named"):
        common.run_cli(raising(OSError("no file named")))


def test_ctrl_c_says_the_scripts_own_line_and_say_receives_the_error_line():
    with pytest.raises(SystemExit) as exit_:
        common.run_cli(raising(KeyboardInterrupt()), interrupted="interrupted: resume with -resume")
    assert exit_.value.code == "interrupted: resume with -resume"
    said = []
    common.run_cli(raising(train.TrainingError("non-finite loss")), say=said.append)
    assert said == ["error: non-finite loss"]


def test_a_folder_that_is_no_demo_corpus_is_one_line(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "demo_corpus.py", "-root", str(tmp_path / "mine")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {tmp_path / 'mine'}: exists and is not a demo corpus (no valid " \
                                  f"demo_corpus.json): not overwriting it"


def flag_definitions(parser):
    return {action.dest: (action.type, action.default, action.help) for action in parser._actions}


def test_evaluation_and_export_define_their_checkpoint_flags_alike():
    flags = ("model_dir", "window_size", "m_first_conv")
    evaluation, exporting = flag_definitions(evaluate.build_parser()), flag_definitions(export.build_parser())
    assert [evaluation[f] for f in flags] == [exporting[f] for f in flags]


def test_evaluation_and_export_report_a_corrupt_checkpoint_alike(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    lines = []
    for module, argv in ((evaluate, ["-verify", "a.wav", "b.wav", "-device", "cpu"]),
                         (export, ["-formats", "pt2"])):
        with pytest.raises(SystemExit) as exit_:
            module.cli(argv + ["-model_dir", str(bad)])
        lines.append(exit_.value.code)
    assert lines[0] == lines[1] and lines[0].startswith(f"error: {bad}: checkpoint (-model_dir) is truncated")


SCRIPTS = ["train_RawNet2.py", "evaluate_pretrained_RawNet2.py", "export_RawNet2.py",
           "RawNet1/train_RawNet.py", "RawNet1/train_bvec.py", "RawNet1/pre_process_waveforms.py",
           "DB/prepare_dataset.py", "DB/convert_vox2_to_wav.py", "demo_corpus.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_gives_each_default_once_and_never_none(script, capsys, monkeypatch):
    folder, name = os.path.split(script)
    monkeypatch.syspath_prepend(os.path.join(ROOT, folder))
    module = importlib.import_module(name.removesuffix(".py"))
    parse = module.build_parser().parse_args if hasattr(module, "build_parser") else module.parse_args
    with pytest.raises(SystemExit):
        parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: )" not in text
    assert "(default: True)" in text or "(default: False)" in text or "(default: " in text
    for line in text.split(" -")[1:]:  # one flag each, with its help
        assert line.count("(default: ") <= 1 and not ("(default: " in line and "(default " in line), line
