"""`d3ip benchmark`: options -> bench.runner.run_benchmark -> results folder + table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from d3ip_cli.cli._common import (
    STATE,
    DeviceOpt,
    OverwriteOpt,
    SeedOpt,
    emit_json,
    err_console,
    guarded,
    log,
    set_threads,
    warn,
)


def _print_table(doc: dict, to_stderr: bool) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from d3ip_cli.bench.report import TABLE_HEADER, table

    t = Table(title=f"d3ip benchmark: {doc['suite']['name']} ({doc['wall_time_s'] / 60:.1f} min)", title_style="bold",
              box=box.SIMPLE_HEAD)
    for i, h in enumerate(TABLE_HEADER):
        t.add_column(h, justify="left" if i < 2 else "right", no_wrap=True)
    rows = table(doc)
    for i, row in enumerate(rows):
        cells = list(row["cells"])
        if row["best"]:
            cells[2] = f"[bold green]{cells[2]}[/bold green]"
        if row["row"]["status"] != "ok":
            cells[2] = f"[red]{cells[2]}[/red]"
        last_of_case = i + 1 == len(rows) or rows[i + 1]["cells"][0] != cells[0]
        t.add_row(*cells, end_section=last_of_case)
    console = Console(stderr=to_stderr, highlight=False, emoji=False)
    if not console.is_terminal:
        console = Console(stderr=to_stderr, highlight=False, width=200, emoji=False)
    console.print(t)


def register(app: typer.Typer) -> None:
    @app.command("benchmark")
    @guarded
    def benchmark(
        output: Annotated[Path, typer.Option("-o", "--output", help="Results folder (created).")],
        suite: Annotated[str, typer.Option(
            "--suite", help="quick (CPU, < 20 min), claims (the engine's quality claims at 128x128; ~6-10 min "
                            "CPU), standard, paper (GPU), or smoke (a seconds-long check that the machinery works; "
                            "its numbers mean nothing).")] = "quick",
        data: Annotated[Optional[list[Path]], typer.Option("--data", metavar="PATH", help="Extra volume to benchmark on "
                                                                          "(repeatable; out of distribution).")] = None,
        methods: Annotated[Optional[str], typer.Option("--methods", help="Comma-separated methods replacing the "
                                                                         "suite's, e.g. fbp,tv,d3ip.")] = None,
        prior: Annotated[Optional[str], typer.Option("--prior", help="Prior weights (.safetensors); default: "
                                                                     "the bundled prior.")] = None,
        slices: Annotated[Optional[int], typer.Option("--slices", help="Slab size (slices per case), overriding "
                                                                       "the suite's.")] = None,
        grid: Annotated[Optional[int], typer.Option("--grid", help="In-plane grid N x N, overriding the suite's.")] = None,
        preset: Annotated[Optional[str], typer.Option("--preset", help="Diffusion preset (fast, standard, paper), "
                                                                       "overriding the suite's.")] = None,
        threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads per run (default: torch's "
                                                                          "choice; timings depend on it).")] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print results.json as one JSON object on stdout "
                                                              "(the table then goes to stderr).")] = False,
        seed: SeedOpt = 0,
        device: DeviceOpt = "auto",
        overwrite: OverwriteOpt = False,
        debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of failures.")] = False,
    ) -> None:
        """Benchmark reconstruction methods on simulated undersampled scans (suites in the README, "Results").

        Runs cases (task x volume: 3D phantoms in distribution, the bundled real-anatomy example
        and any --data volume out of distribution) x methods with fixed seeds, tuning the weights
        of tv and l1-wavelet on a held-out slice. Writes results.json, results.csv, results.md,
        psnr_vs_time.png, montage.png and every run's output and run record (runs/) into -o DIR,
        and prints the table (with --json: the results document on stdout, the table on stderr).
        If some runs fail, the others are still written and the exit code is 1.

        Example: d3ip benchmark --suite quick -o out/bench
        """
        if debug:
            STATE["debug"] = True
        import sys

        from d3ip_cli.bench.runner import run_benchmark
        from d3ip_cli.cli._common import progress_bar
        from d3ip_cli.core.device import resolve_device

        set_threads(threads)
        dev = resolve_device(device)
        method_list = [m for m in methods.split(",")] if methods is not None else None
        with progress_bar("benchmark", disable=not err_console.is_terminal) as cb:  # plain logs: one line a run
            doc = run_benchmark(suite, output, data=[str(p) for p in (data or [])], methods=method_list, prior=prior,
                                seed=seed, device=dev, overwrite=overwrite, slices=slices, grid=grid, preset=preset, progress=cb,
                                log=log, argv=["d3ip", *sys.argv[1:]])
        _print_table(doc, to_stderr=json_out)
        for note in doc.get("notes", []):
            warn(note, "note")
        if json_out:
            emit_json(doc)
        else:
            log(f"wrote {output}/results.json, results.csv, results.md, psnr_vs_time.png, montage.png "
                f"({doc['wall_time_s'] / 60:.1f} min)")
        if doc["failed"]:
            from d3ip_cli.core.errors import D3ipError

            raise D3ipError(f"{doc['failed']} run(s) failed (see the error column of {output}/results.csv); "
                            "the other results were written")
