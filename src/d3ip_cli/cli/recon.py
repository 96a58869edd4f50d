"""`d3ip reconstruct` (placeholder until its issue lands)."""

from __future__ import annotations

import typer

from d3ip_cli.cli._common import guarded
from d3ip_cli.core.errors import MissingComponentError


def register(app: typer.Typer) -> None:
    @app.command("reconstruct", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    @guarded
    def _cmd(ctx: typer.Context) -> None:
        """Not available in this version yet."""
        raise MissingComponentError("d3ip reconstruct is not available in this version yet")
