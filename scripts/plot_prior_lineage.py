"""Draw the bundled prior's quality against images seen across its training stages.

Each stage folder in ``training/`` keeps its own ``quality.csv`` (rows written by
``scripts/eval_prior.py``). This joins the rows of the stages the bundled prior descends
from, in order, into one CSV and draws it with :func:`eval_prior.plot_csv`::

    python scripts/plot_prior_lineage.py training/prior_cpu training/prior_cpu_veps \\
        training/prior_cpu_anneal training/prior_gpu_h100 --until prior_cpu=6250 \\
        --csv docs/prior/quality_lineage.csv --plot docs/prior/quality.png

Rows of a stage that are not on the lineage (an evaluation of another branch, at more steps
than the next stage started from) are left out with ``--until STAGE=STEPS``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_prior import plot_csv  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stages", nargs="+", type=Path, help="stage folders holding quality.csv, parent first")
    ap.add_argument("--until", action="append", default=[], metavar="STAGE=STEPS",
                    help="keep only rows of STAGE with at most STEPS total steps")
    ap.add_argument("--csv", required=True, type=Path)
    ap.add_argument("--plot", required=True, type=Path)
    args = ap.parse_args(argv)
    limits = {Path(k).name: int(v) for k, v in (u.split("=", 1) for u in args.until)}
    rows: list[dict] = []
    fields: list[str] = []
    for stage in args.stages:
        with open(stage / "quality.csv", newline="") as fh:
            reader = csv.DictReader(fh)
            for f in reader.fieldnames or []:
                if f not in fields:
                    fields.append(f)
            for r in reader:
                if stage.name in limits and int(r["steps"]) > limits[stage.name]:
                    continue
                rows.append(dict(r, stage=stage.name))
    if "stage" not in fields:
        fields.append("stage")
    with open(args.csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, restval="")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    plot_csv(args.csv, args.plot)
    print(f"{len(rows)} rows -> {args.csv}, {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
