"""Every command answers --help quickly, has help text with an example, and is documented in the README."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

COMMANDS = ["info", "convert", "simulate", "reconstruct", "pretrain-phantom", "benchmark", "operators", "metrics"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help(cli, command):
    r = cli([command, "--help"])
    assert r.exit_code == 0, r.output
    assert "Example" in r.output
    assert "not available" not in r.output.lower()


def test_version(cli):
    from d3ip_cli import __version__

    r = cli(["--version"])
    assert r.exit_code == 0 and __version__ in r.output


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, d3ip_cli.cli as c; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert time.perf_counter() - t < 5  # generous; typically ~0.2 s


def test_readme_documents_every_command_and_exit_code():
    readme = (ROOT / "README.md").read_text()
    for c in COMMANDS:
        assert f"d3ip {c}" in readme, c
    for code in ("| 0 ", "| 2 ", "| 3 ", "| 4 ", "| 5 ", "| 6 ", "| 130 "):
        assert code in readme, code


@pytest.mark.parametrize("args, text", [
    (["reconstruct", "x.nii.gz", "--grid", "abc"], "Invalid value for '--grid'"),
    (["reconstruct", "--bogus"], "No such option: --bogus"),
    (["simulate"], "Missing argument"),
    (["nonsense"], "No such command 'nonsense'"),
])
def test_parse_errors_are_one_line(args, text):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "d3ip_cli", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0] and "--help" in lines[0], r.stderr
    assert r.stdout == ""


def test_a_parse_error_with_brackets_is_still_one_line():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "d3ip_cli", "reconstruct", "--bogus-[/b]"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: No such option: --bogus-[/b] (see d3ip reconstruct --help)"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_is_accepted_before_or_after_any_command(tmp_path, where):
    """``--debug`` works with every command, not only those that list it (here ``info``)."""
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    args = ["--debug", "info", str(bad)] if where == "before" else ["info", str(bad), "--debug"]
    r = subprocess.run([sys.executable, "-m", "d3ip_cli", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    assert "Traceback" in r.stderr and r.stderr.rstrip().splitlines()[-1].startswith("error:"), r.stderr
    plain = subprocess.run([sys.executable, "-m", "d3ip_cli", "info", str(bad)], capture_output=True, text=True,
                           timeout=120)
    assert plain.returncode == 3 and "Traceback" not in plain.stderr


@pytest.mark.parametrize("args", [["reconstruct", "--help"], ["operators"]])
def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(args):
    """`d3ip operators | head -1`: the reader closes stdout early, a normal end in a pipeline. The
    command stops with 141 (as a shell reports SIGPIPE) and no 'internal error' on stderr, both for
    help text (printed by Typer) and for a command's own output."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the command writes anything: every write meets EPIPE
    try:
        r = subprocess.run([sys.executable, "-m", "d3ip_cli", *args], stdout=write_end, stderr=subprocess.PIPE,
                           text=True, timeout=120)
    finally:
        os.close(write_end)
    assert r.returncode == 141, r.stderr
    assert "error" not in r.stderr.lower() and "Traceback" not in r.stderr, r.stderr


def test_under_torchrun_other_ranks_name_themselves_in_their_error_line(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    r = cli(["info", tmp_path / "nothing.nii"])
    assert r.exit_code == 3 and r.stderr.startswith("error (rank 1): ") and r.stderr.count("\n") == 1, r.stderr
    monkeypatch.setenv("RANK", "0")
    r = cli(["info", tmp_path / "nothing.nii"])
    assert r.stderr.startswith("error: "), r.stderr
