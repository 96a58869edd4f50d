"""Shared pytest fixtures: seeded generators, tiny sizes, CLI runner, temp dirs."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng() -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(1234)
    return g


@pytest.fixture
def cli():
    """Invoke the real Typer app in-process: ``cli(["info", path])`` -> Result."""
    from typer.testing import CliRunner

    from d3ip_cli.cli import app

    runner = CliRunner()

    def invoke(args, **kw):
        return runner.invoke(app, [str(a) for a in args], **kw)

    return invoke


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads; on a busy 2-core machine two threads cost ~5x.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def prior(tmp_path_factory):
    """Path of a `tiny` prior trained once per session (machinery, not quality)."""
    from d3ip_cli.prior import pretrain as pt

    path = tmp_path_factory.mktemp("prior") / "tiny.safetensors"
    pt.train(pt.PretrainConfig.from_preset("tiny", steps=6), path)
    return path
