"""DB/convert_vox2_to_wav.py: path mapping, resumability, failures, with a stand-in ffmpeg."""

import os
import stat
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "DB"))
import convert_vox2_to_wav as convert  # noqa: E402

FAKE_FFMPEG = f"""#!{sys.executable}
import sys
args = sys.argv[1:]
src, dst = args[args.index("-i") + 1], args[-1]
assert args[args.index("-ar") + 1] == "16000" and args[args.index("-ac") + 1] == "1"
if "broken" in src:
    sys.exit("Invalid data found when processing input")
open(dst, "w").write("converted " + src)
"""


@pytest.fixture
def fake_ffmpeg(tmp_path):
    path = tmp_path / "ffmpeg"
    path.write_text(FAKE_FFMPEG)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def make_m4a(root, keys):
    for key in keys:
        os.makedirs(os.path.join(root, os.path.dirname(key)), exist_ok=True)
        open(os.path.join(root, key), "w").write("m4a")


def test_converts_every_file_into_the_wav_tree_and_resumes(tmp_path, fake_ffmpeg):
    make_m4a(tmp_path / "dev", ["id00012/abc/00001.m4a", "id00012/abc/00002.m4a"])
    make_m4a(tmp_path / "test", ["id00017/xyz/00001.m4a"])
    out = str(tmp_path / "wav")
    args = convert.parse_args([str(tmp_path / "dev"), str(tmp_path / "test"), "-out", out, "-jobs", "2",
                               "-ffmpeg", fake_ffmpeg])
    assert convert.main(args) == 0
    made = sorted(os.path.relpath(os.path.join(p, f), out) for p, _, fs in os.walk(out) for f in fs)
    assert made == ["id00012/abc/00001.wav", "id00012/abc/00002.wav", "id00017/xyz/00001.wav"]
    assert convert.find_jobs([str(tmp_path / "dev"), str(tmp_path / "test")], out) == []


def test_failed_file_leaves_no_partial_wav(tmp_path, fake_ffmpeg):
    make_m4a(tmp_path / "dev", ["id1/broken/00001.m4a", "id1/ok/00001.m4a"])
    out = str(tmp_path / "wav")
    assert convert.main(convert.parse_args([str(tmp_path / "dev"), "-out", out, "-ffmpeg", fake_ffmpeg])) == 1
    assert not os.path.exists(os.path.join(out, "id1/broken/00001.wav"))
    assert not os.path.exists(os.path.join(out, "id1/broken/00001.wav.part.wav"))
    assert os.path.exists(os.path.join(out, "id1/ok/00001.wav"))


def test_a_folder_without_m4a_files_is_one_line(tmp_path, fake_ffmpeg):
    os.makedirs(tmp_path / "dev" / "id1" / "v1")
    (tmp_path / "dev" / "id1" / "v1" / "00001.wav").write_bytes(b"")  # already converted elsewhere
    with pytest.raises(convert.DataError, match=r"dev: no .m4a files found"):
        convert.main(convert.parse_args([str(tmp_path / "dev"), "-out", str(tmp_path / "wav"),
                                         "-ffmpeg", fake_ffmpeg]))


@pytest.mark.parametrize("jobs", ["0", "-1"])
def test_jobs_below_one_is_one_line(tmp_path, fake_ffmpeg, jobs):
    make_m4a(tmp_path / "dev", ["id1/ok/00001.m4a"])
    with pytest.raises(convert.DataError, match=rf"^-jobs {jobs}: must be at least 1"):
        convert.main(convert.parse_args([str(tmp_path / "dev"), "-out", str(tmp_path / "wav"), "-jobs", jobs,
                                         "-ffmpeg", fake_ffmpeg]))
