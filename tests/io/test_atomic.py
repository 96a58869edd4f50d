"""Atomic outputs: nothing is overwritten without --overwrite, except an empty folder made for them."""

from __future__ import annotations

import os
import time

import pytest

from d3ip_cli.core.errors import OutputError
from d3ip_cli.io.atomic import atomic_output, check_output


def test_an_empty_folder_made_beforehand_takes_a_folder_output(tmp_path):
    out = tmp_path / "series"
    out.mkdir()
    check_output(out, series=True)  # `mkdir out` first is a common habit
    with atomic_output(out, directory=True) as tmp:
        (tmp / "IM00001.dcm").write_bytes(b"x")
    assert (out / "IM00001.dcm").read_bytes() == b"x"
    with pytest.raises(OutputError, match="exists"):  # now it holds an output: refused again
        check_output(out, series=True)


def test_an_empty_folder_at_a_file_output_is_refused_before_any_work(tmp_path):
    """A NIfTI or NumPy output cannot go where a folder is: refused up front, not after the run
    with "appeared while writing"."""
    out = tmp_path / "recon.nii.gz"
    out.mkdir()
    with pytest.raises(OutputError, match=r"output .*recon.nii.gz exists \(use --overwrite"):
        check_output(out)
    with pytest.raises(OutputError, match="exists"):
        with atomic_output(out) as tmp:
            tmp.write_bytes(b"x")
    assert out.is_dir() and not any(out.iterdir())


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


def test_a_write_error_is_one_line_without_the_traceback_a_library_folds_in(tmp_path):
    """pydicom re-raises an element's OSError with its traceback in the message; the user sees one line."""
    from d3ip_cli.io.atomic import os_error_text

    folded = OSError("With tag (7FE0,0010) got exception: [Errno 28] No space left on device\n"
                     "Traceback (most recent call last):\n  File \"filewriter.py\", line 1\n")
    assert os_error_text(folded) == "With tag (7FE0,0010) got exception: [Errno 28] No space left on device"
    assert os_error_text(OSError(28, "No space left on device")) == "No space left on device"
    with pytest.raises(OutputError, match=r"^cannot write .*got exception: \[Errno 28\] No space left on device$"):
        with atomic_output(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise folded
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_dicom_output_inside_an_input_series_folder_is_refused(tmp_path):
    """Written into the input's series folder, a DICOM output would join that series (and `info`
    on it would then find two series); a NIfTI, NumPy or JSON file there is ignored by the
    reader, so it is allowed; so is any output beside a single DICOM file, which is read alone."""
    series = tmp_path / "ex"
    series.mkdir()
    (series / "IM1.dcm").write_bytes(b"x")
    with pytest.raises(OutputError, match="lies inside the input's DICOM series folder"):
        check_output(series / "sub", inputs=(series,), series=True)
    check_output(series / "sub", inputs=(series / "IM1.dcm",), series=True)
    check_output(tmp_path / "beside", inputs=(series,), series=True)
    check_output(series / "vol.nii.gz", inputs=(series,))  # not DICOM: the reader skips it


def test_an_error_with_a_blank_message_still_gives_a_line():
    from d3ip_cli.io.atomic import os_error_text

    assert os_error_text(OSError("\n")) == "OSError"


def test_leftovers_of_a_killed_writer_on_this_host_are_removed_and_no_others(tmp_path):
    import socket
    import subprocess

    from d3ip_cli.io.atomic import PARTIAL_PREFIX, atomic_output

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    host = socket.gethostname()
    names = {
        "killed": f"{PARTIAL_PREFIX}out.nii.gz-0123abcd-pid{gone.pid}@{host}",
        "killed_old": f"{PARTIAL_PREFIX}old-out.nii.gz-0123abcd-pid{gone.pid}@{host}",
        "live": f"{PARTIAL_PREFIX}out.nii.gz-4567abcd-pid{os.getppid()}@{host}",
        "other_host": f"{PARTIAL_PREFIX}out.nii.gz-89ababcd-pid{gone.pid}@elsewhere-{host}",
        "other_target": f"{PARTIAL_PREFIX}other.nii.gz-0123abcd-pid{gone.pid}@{host}",
        "unnamed": f"{PARTIAL_PREFIX}out.nii.gz-0123abcd",  # an older version's name: whose it is is unknown
    }
    names["young"] = f"{PARTIAL_PREFIX}out.nii.gz-0123abce-pid{gone.pid}@{host}"  # may be another namespace's
    names["no_pid"] = f"{PARTIAL_PREFIX}out.nii.gz-0123abcf-pid{10**30}@{host}"
    old = time.time() - 2 * 3600
    for key, n in names.items():
        (tmp_path / n).mkdir()
        if key != "young":
            os.utime(tmp_path / n, (old, old))
    with atomic_output(tmp_path / "out.nii.gz") as tmp:
        tmp.write_bytes(b"x")
    left = {p.name for p in tmp_path.iterdir()}
    assert (tmp_path / "out.nii.gz").read_bytes() == b"x"
    assert names["killed"] not in left and names["killed_old"] not in left
    assert {names[k] for k in ("live", "other_host", "other_target", "unnamed", "young", "no_pid")} <= left


def test_checkpoint_writes_use_a_partial_name_of_their_own_and_sweep_a_killed_one(tmp_path):
    """Training states and priors (safetensors) follow the same naming as every other output."""
    import socket
    import subprocess

    import torch

    from d3ip_cli.io.atomic import PARTIAL_PREFIX
    from d3ip_cli.prior.checkpoint import load_tensors, save_tensors

    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = tmp_path / f"{PARTIAL_PREFIX}p.state.safetensors-0123abcd-pid{gone.pid}@{socket.gethostname()}"
    stale.write_bytes(b"half a state")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    save_tensors(tmp_path / "p.state.safetensors", {"w": torch.ones(3)}, {"steps": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["p.state.safetensors"]
    tensors, meta = load_tensors(tmp_path / "p.state.safetensors")
    assert meta["steps"] == 1 and torch.equal(tensors["w"], torch.ones(3))
