"""Benchmark outputs: ``results.json``, ``results.csv``, ``results.md``, ``psnr_vs_time.png``, ``montage.png``.

Every file is written atomically; ``results.json`` is written last, so a folder holding it
holds a finished benchmark. :func:`table` gives the formatted cells shared by the
Markdown table and the CLI's rich table.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from d3ip_cli.io.atomic import atomic_output, write_json

OUTPUT_FILES = ("results.json", "results.csv", "results.md", "psnr_vs_time.png", "montage.png")

TABLE_HEADER = ("case", "method", "PSNR dB", "SSIM", "z-err", "time s", "CPU s", "RSS MiB", "NFE", "weight")
"""Columns of the printed and Markdown tables (see ``results.json`` ``columns`` for their meaning)."""


def _training(prior: dict) -> str:
    """``6250 training steps``, or for a prior trained in stages the totals over its stages."""
    tot = prior.get("total") or {}
    if tot.get("stages", 1) > 1:
        return (f"{tot['steps']} training steps / {tot['images_seen']:,} phantom images in {tot['stages']} stages, "
                f"the last {prior.get('steps')} steps")
    return f"{prior.get('steps')} training steps"


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def table(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per row: ``cells`` (strings, :data:`TABLE_HEADER` order), ``best`` (highest PSNR of its case)."""
    best: dict[str, float] = {}
    for r in doc["rows"]:
        if r["status"] == "ok" and r["psnr"] is not None:
            best[r["case"]] = max(best.get(r["case"], -math.inf), r["psnr"])
    out = []
    for r in doc["rows"]:
        if r["status"] != "ok":
            cells = [r["case"], r["method"], "failed"] + ["-"] * (len(TABLE_HEADER) - 3)
        else:
            cells = [r["case"], r["method"], _fmt(r["psnr"], ".2f"), _fmt(r["ssim"], ".3f"), _fmt(r["z_rel_l2"], ".3f"),
                     _fmt(r["wall_time_s"], ".1f"), _fmt(r.get("cpu_time_s"), ".1f"), _fmt(r["peak_rss_mb"], ".0f"),
                     _fmt(r["model_evaluations"], "d"),
                     _fmt(r["weight"], ".0e")]
        out.append({"cells": cells, "best": r["status"] == "ok" and r["psnr"] is not None
                    and r["psnr"] == best.get(r["case"]), "row": r})
    return out


def markdown(doc: dict[str, Any]) -> str:
    """``results.md``: what was run, where, the table, and the figures."""
    env = doc["environment"]
    s = doc["suite"]
    prior = doc.get("prior") or {}
    lines = [
        f"# d3ip benchmark: `{s['name']}` suite",
        "",
        f"{s['description'][:1].upper()}{s['description'][1:]}.",
        "",
        f"- Machine: {env['cpu']} ({env['cpu_count']} cores), {env['torch_threads']} torch thread(s), device "
        f"`{doc['device']}`{(' (' + env['gpu'] + ')') if env.get('gpu') else ''}; torch {env['torch']}, d3ip {env['d3ip']}.",
        f"- Slabs of {s['slices']} slices at {s['grid']}x{s['grid']}"
        + "".join(f" ({c['task']} on {c['volume']}: {c['slices']} slices)" for c in s.get("cases", [])
                  if c.get("slices") and c["slices"] != s["slices"])
        + f"; diffusion preset `{s['preset']}`"
        + (f" with {', '.join(f'{k}={v}' for k, v in s['engine'].items())}" if s.get("engine") else "")
        + f"; seed {doc['seed']}; noise {s['noise'].get('noise', 'none')}.",
    ]
    if prior:
        lines.append(f"- Prior: `{Path(str(prior.get('path'))).name}` (sha256 {str(prior.get('sha256'))[:12]}..., "
                     f"{_training(prior)}, preset {prior.get('preset')}).")
    lines += [
        "- `tv` and `l1-wavelet`: `--weight` tuned on a held-out slice of the same volume (best PSNR over "
        f"{', '.join(f'{w:g}' for w in s['tune_grid'].get('tv', ()))}).",
        "- PSNR over the 3D slab and SSIM (mean over axial slices), data range = reference max - min; z-error: "
        "through-slice relative error of slice differences; time: wall seconds of the reconstruction alone; CPU: "
        "CPU seconds of the run's process (loading and simulation included; robust to other load on the machine); "
        "RSS: peak resident memory of the run's own process (interpreter, torch and prior included); NFE: network "
        "evaluations (slice images through the U-Net; adaptation ones also back-propagate).",
        f"- Total wall time {doc['wall_time_s'] / 60:.1f} min; {len(doc['rows'])} runs, {doc['failed']} failed.",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "|".join(["---"] * 2 + ["--:"] * (len(TABLE_HEADER) - 2)) + "|",
    ]
    cases = {c["id"]: c for c in doc["cases"]}
    previous = None
    for t in table(doc):
        cells = list(t["cells"])
        c = cases.get(cells[0])
        case_id = cells[0]
        if case_id == previous:
            cells[0] = ""
        elif c is not None:
            cells[0] = f"{c['label']} / {c['volume']}{'' if c['in_distribution'] else ' (OOD)'}"
        previous = case_id
        if t["best"]:
            cells[2] = f"**{cells[2]}**"
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Best PSNR of each case in bold. OOD: out of distribution for the phantom-trained prior.", ""]
    if doc.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    lines += ["![PSNR against wall time](psnr_vs_time.png)", "", "![One slice per method and case](montage.png)", ""]
    return "\n".join(lines)


def write_csv(doc: dict[str, Any], path: Path) -> Path:
    columns = list(doc["columns"])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in doc["rows"]:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(buf.getvalue())
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _method_colours(methods: list[str]) -> dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _method_order(doc: dict[str, Any]) -> list[str]:
    from d3ip_cli.bench.suites import ALL_METHODS

    seen = {r["method"] for r in doc["rows"]}
    return [m for m in ALL_METHODS if m in seen] + sorted(seen - set(ALL_METHODS))


def plot_psnr_time(doc: dict[str, Any], path: Path) -> Path:
    """One panel per case: PSNR against reconstruction wall time (log scale), one colour per method."""
    plt = _plt()
    case_ids = [c["id"] for c in doc["cases"]]
    labels = {c["id"]: f"{c['label']} / {c['volume']}" for c in doc["cases"]}
    methods = _method_order(doc)
    colours = _method_colours(methods)
    n = max(1, len(case_ids))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows + 0.6), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, cid in zip(axes.flat, case_ids):
        pts = [r for r in doc["rows"] if r["case"] == cid and r["status"] == "ok" and r["psnr"] is not None]
        for r in pts:
            t = max(float(r["wall_time_s"] or 0.0), 1e-3)
            ax.scatter([t], [r["psnr"]], color=colours[r["method"]], s=36, zorder=3)
            ax.annotate(r["method"], (t, r["psnr"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xscale("log")
        ax.set_title(labels[cid], fontsize=9)
        ax.set_xlabel("wall time (s)", fontsize=8)
        ax.set_ylabel("PSNR (dB)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both")
    handles = [plt.Line2D([], [], marker="o", ls="", color=colours[m], label=m) for m in methods]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(methods), 10), fontsize=8, frameon=False)
    fig.suptitle(f"d3ip benchmark ({doc['suite']['name']}): PSNR against reconstruction time", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    with atomic_output(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def plot_montage(doc: dict[str, Any], centers: dict[tuple[str, str], np.ndarray],
                 references: dict[str, np.ndarray], path: Path) -> Path:
    """Rows: cases; columns: the reference then each method; the slab's central slice, with its PSNR."""
    plt = _plt()
    case_ids = [c["id"] for c in doc["cases"]]
    labels = {c["id"]: f"{c['setting']} / {c['volume']}" for c in doc["cases"]}
    methods = _method_order(doc)
    psnr = {(r["case"], r["method"]): r["psnr"] for r in doc["rows"] if r["status"] == "ok"}
    cols = ["reference"] + methods
    fig, axes = plt.subplots(len(case_ids) or 1, len(cols), figsize=(1.35 * len(cols), 1.45 * max(1, len(case_ids))),
                             squeeze=False)
    for i, cid in enumerate(case_ids):
        ref = references.get(cid)
        lo, hi = (np.percentile(ref, [0.5, 99.5]) if ref is not None else (0.0, 1.0))
        for j, col in enumerate(cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            img = ref if col == "reference" else centers.get((cid, col))
            if img is not None:
                ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
                if col != "reference" and psnr.get((cid, col)) is not None:
                    ax.set_xlabel(f"{psnr[(cid, col)]:.1f} dB", fontsize=6, labelpad=1)
            if i == 0:
                ax.set_title(col, fontsize=7)
            if j == 0:
                ax.set_ylabel(labels[cid], fontsize=6)
    fig.tight_layout(pad=0.3, h_pad=0.4, w_pad=0.2)
    with atomic_output(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def write_outputs(doc: dict[str, Any], out_dir: Path, *, centers: dict[tuple[str, str], np.ndarray],
                  references: dict[str, np.ndarray]) -> dict[str, str]:
    """Write everything but ``results.json`` (see :func:`write_json_last`); return the file names."""
    out_dir = Path(out_dir)
    write_csv(doc, out_dir / "results.csv")
    plot_psnr_time(doc, out_dir / "psnr_vs_time.png")
    plot_montage(doc, centers, references, out_dir / "montage.png")
    files = {"json": "results.json", "csv": "results.csv", "markdown": "results.md", "plot": "psnr_vs_time.png",
             "montage": "montage.png", "runs": "runs/"}
    return files


def write_json_last(doc: dict[str, Any], out_dir: Path) -> None:
    """``results.md`` (it quotes the total wall time), then ``results.json``: the mark of a finished run."""
    with atomic_output(Path(out_dir) / "results.md", overwrite=True) as tmp:
        tmp.write_text(markdown(doc))
    write_json(Path(out_dir) / "results.json", doc, overwrite=True)


__all__ = ["OUTPUT_FILES", "TABLE_HEADER", "table", "markdown", "write_csv", "plot_psnr_time", "plot_montage",
           "write_outputs", "write_json_last"]
