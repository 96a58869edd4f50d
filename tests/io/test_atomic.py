"""Atomic outputs: nothing is overwritten without --overwrite, except an empty folder made for them."""

from __future__ import annotations

import pytest

from d3ip_cli.core.errors import OutputError
from d3ip_cli.io.atomic import atomic_output, check_output


def test_an_empty_folder_made_beforehand_takes_a_folder_output(tmp_path):
    out = tmp_path / "series"
    out.mkdir()
    check_output(out)  # `mkdir out` first is a common habit
    with atomic_output(out, directory=True) as tmp:
        (tmp / "IM00001.dcm").write_bytes(b"x")
    assert (out / "IM00001.dcm").read_bytes() == b"x"
    with pytest.raises(OutputError, match="exists"):  # now it holds an output: refused again
        check_output(out)


def test_a_folder_with_anything_in_it_or_a_file_is_not_replaced(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep")
    with pytest.raises(OutputError):
        check_output(full)
    f = tmp_path / "out.nii.gz"
    f.write_bytes(b"old")
    with pytest.raises(OutputError, match="exists"):
        check_output(f)
    assert f.read_bytes() == b"old" and (full / "notes.txt").read_text() == "keep"
