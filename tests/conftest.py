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
