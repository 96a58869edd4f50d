"""`d3ip operators`: list tasks and backends; `--check` validates every registered operator."""

from __future__ import annotations

from typing import Annotated

import typer

from d3ip_cli.cli._common import JsonOpt, emit_json, guarded, log


def register(app: typer.Typer) -> None:
    @app.command("operators")
    @guarded
    def operators(
        check: Annotated[bool, typer.Option("--check", help="Run adjoint, linearity, normal and backend-agreement "
                                                            "checks on every registered operator.")] = False,
        json_out: JsonOpt = False,
    ) -> None:
        """List the tasks and CT backends present; with --check, validate them.

        The checks (float64, small odd sizes, batches of slices): dot-product adjoint test,
        adjoint against autograd, linearity, normal = adjoint(forward), and agreement of each
        optional CT backend with the native projector. Exits 1 when a check fails.

        Example: d3ip operators --check --json
        """
        from d3ip_cli.engine.methods import available_methods
        from d3ip_cli.physics.checks import run_checks, summary

        doc = summary()
        doc["methods"] = available_methods()
        failed = False
        if check:
            doc["checks"] = run_checks()
            failed = not doc["checks"]["passed"]
        if json_out:
            emit_json(doc)
        else:
            _print(doc)
        if failed:
            log("error: operator check failed: " + "; ".join(doc["checks"]["failures"]))
            raise typer.Exit(1)


def _print(doc: dict) -> None:
    typer.echo("tasks:")
    for name, t in doc["tasks"].items():
        opts = ", ".join(f"{k}={v}" for k, v in t["defaults"].items())
        typer.echo(f"  {name:14s} {t['modality']:3s} {t['description']} ({opts})")
    typer.echo("CT backends:")
    for name, reason in doc["backends"].items():
        typer.echo(f"  {name:12s} {'available' if reason is None else 'not available: ' + reason}")
    typer.echo("methods: " + ", ".join(doc["methods"]))
    checks = doc.get("checks")
    if not checks:
        return
    typer.echo(f"checks (worst relative errors, float64; tolerance {checks['tolerance']:g}):")
    for case in checks["cases"]:
        errs = "  ".join(f"{k}={v:.1e}" for k, v in case["errors"].items())
        typer.echo(f"  {'ok  ' if case['passed'] else 'FAIL'} {case['id']:32s} {errs}")
    for agr in checks["agreement"]:
        typer.echo(f"  {'ok  ' if agr['passed'] else 'FAIL'} {agr['id']:32s} forward={agr['forward']:.1e}  "
                   f"adjoint={agr['adjoint']:.1e}")
    typer.echo("worst: " + "  ".join(f"{k}={v:.1e}" for k, v in checks["worst"].items()))
