"""``d3ip benchmark``: a cases x methods grid of retrospective reconstructions (DESIGN §8).

::

    suite ──► cases (task setting x volume, slab + held-out slice) ──► for each case:
        tune --weight of tv / l1-wavelet on the held-out slice (log grid, best PSNR)
        run every method on the slab through engine.recon.reconstruct (the code path of
        ``d3ip reconstruct``), keep its output volume and run record in DIR/runs/CASE/
    ──► rows (metrics, wall time, peak memory, network evaluations) ──► results.json / .csv / .md,
        psnr_vs_time.png, montage.png (bench.report)

Runs happen one after the other with fixed seeds: every method of a case sees the same
measurement (simulated from the seed) and the diffusion methods the same noise. Each
evaluated (case, method) runs in a fresh process (forked from a ``multiprocessing`` fork
server that has imported the modules but computed nothing; spawned where there is no fork
server) that first loads the prior and pays other one-time costs, and only then starts the
timed part; weight tuning runs in this process. ``isolate=False`` runs everything here.

Time (``wall_time_s``) is the run record's ``reconstruct`` stage: ``A^+ y`` plus the method,
not reading, simulating or writing. Peak memory (``peak_rss_mb``) is the resident-set
high-water mark of the run's process, reset (Linux ``/proc/self/clear_refs``) once the
warm-up is done; it includes the interpreter, torch and the prior (``rss_before_mb``,
a few hundred MiB), and ``peak_rss_delta_mb`` is the run's own growth over that. Where
the reset is unavailable it is the process lifetime maximum (``memory_method`` says
which). In-process runs (``isolate=False``) share one process whose allocator keeps
memory freed by earlier runs, so their memory columns under-state later runs. On CUDA
``peak_gpu_mb`` is ``torch.cuda.max_memory_allocated`` reset per run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import re
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from d3ip_cli import __version__
from d3ip_cli.bench.suites import ALL_METHODS, TASK_SETTINGS, TUNED, VOLUMES, Suite, TaskSetting, VolumeSpec, get_suite
from d3ip_cli.core.errors import D3ipError, MissingComponentError, OutputError, UsageError

Progress = Callable[[int, int, dict], None]
Log = Callable[[str], None]

ROW_COLUMNS: dict[str, str] = {
    "case": "case id: task setting _ volume",
    "task": "task (sparse-view, limited-angle, cs-mri)",
    "setting": "task setting (views, arc or acceleration)",
    "volume": "volume id",
    "in_distribution": "true for phantoms (like the prior's training data), false for real anatomy",
    "shape": "slab reconstructed, Z x H x W",
    "method": "method",
    "status": "ok or failed",
    "psnr": "PSNR over the 3D slab (dB), data range = reference max - min (column data_range)",
    "ssim": "SSIM, mean of 2D SSIM over the slab's axial slices, same data range",
    "nrmse": "||x - r|| / ||r|| over the slab",
    "z_rel_l2": "through-slice error ||D_z x - D_z r|| / ||D_z r|| (D_z: difference of neighbouring slices)",
    "data_range": "data range used by PSNR and SSIM (volume units)",
    "wall_time_s": "seconds for the reconstruction (A^+ y plus the method; excludes loading and simulation)",
    "cpu_time_s": "CPU seconds of the run's process (all threads) over the whole reconstruction call, loading and "
                  "simulation included: less disturbed than wall time by other load on a shared machine",
    "tuning_time_s": "seconds spent tuning --weight on the held-out slice (tv, l1-wavelet)",
    "peak_rss_mb": "peak resident memory of the process during the run (MiB; see memory_method)",
    "peak_rss_delta_mb": "peak_rss_mb minus the resident memory just before the run (MiB)",
    "peak_gpu_mb": "peak CUDA memory allocated during the run (MiB; empty on CPU)",
    "model_evaluations": "network evaluations (one per slice image per call; adaptation ones also "
                         "back-propagate); empty for classical methods",
    "nfe_sample": "network evaluations while sampling",
    "nfe_adapt": "network evaluations while adapting (each with a backward pass)",
    "weight": "regularisation weight used (tuned for tv and l1-wavelet)",
    "seed": "seed of the measurement simulation and of the method",
    "preset": "engine preset of the diffusion methods",
    "device": "device the run used",
    "record": "run record of the run (relative to the benchmark folder)",
    "error": "why the run failed",
}
"""Columns of ``results.csv`` (and of each row in ``results.json``) with their meaning."""


# ---------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """A task setting on one volume: slab to reconstruct, held-out slice, methods to run."""

    id: str
    setting: TaskSetting
    volume: VolumeSpec
    path: Path
    slab: tuple[int, int]
    tune_slice: int
    held_out: bool
    methods: list[str]
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.setting.task, "setting": self.setting.id, "label": self.setting.label,
                "options": dict(self.setting.options), "volume": self.volume.id, "volume_label": self.volume.label,
                "in_distribution": self.volume.in_distribution, "path": str(self.path),
                "slices": f"{self.slab[0]}:{self.slab[1]}", "tune_slice": self.tune_slice,
                "tune_slice_held_out": self.held_out, "methods": list(self.methods), "skipped": list(self.skipped)}


def choose_slab(n_total: int, n: int) -> tuple[int, int, int, bool]:
    """``(start, stop, tune_index, held_out)``: a central slab of ``n`` slices and a tuning slice.

    The tuning slice lies outside the slab, one slice away from it when the volume allows
    (so it is not the slab's immediate neighbour), else adjacent. With a single slice there
    is nothing to hold out: the slab's own slice is returned with ``held_out=False``.
    """
    if n_total < 1:
        raise UsageError("a benchmark volume needs at least one slice")
    n = max(1, min(n, n_total - 1)) if n_total > 1 else 1
    start = (n_total - n) // 2
    stop = start + n
    if n_total == 1:
        return 0, 1, 0, False
    for cand in (start - 2, stop + 1, start - 1, stop):
        if 0 <= cand < n_total and not start <= cand < stop:
            return start, stop, cand, True
    return start, stop, start, False  # unreachable: n <= n_total - 1 leaves a slice outside


def example_path() -> Path | None:
    """The bundled real-anatomy example (``examples/mni_t1.nii.gz`` of a source checkout), if present."""
    env = os.environ.get("D3IP_EXAMPLE")
    cands = [Path(env)] if env else []
    cands += [Path(__file__).resolve().parents[3] / "examples" / "mni_t1.nii.gz",
              Path.cwd() / "examples" / "mni_t1.nii.gz"]
    for c in cands:
        if c.is_file():
            return c
    return None


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s or "data"


def data_volumes(paths: Sequence[str | os.PathLike]) -> list[VolumeSpec]:
    """``--data PATH`` volumes as :class:`VolumeSpec` (ids from the file names, made unique)."""
    out: list[VolumeSpec] = []
    taken = set(VOLUMES)
    for p in paths:
        path = Path(p)
        if not path.exists():
            from d3ip_cli.core.errors import InputDataError

            raise InputDataError(f"--data {path}: no such file or folder")
        name = path.name
        for suffix in (".nii.gz", ".nii", ".npy", ".dcm", ".h5"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        vid, k = _slug(name), 2
        while vid in taken:
            vid, k = f"{_slug(name)}-{k}", k + 1
        taken.add(vid)
        out.append(VolumeSpec(vid, "file", f"{path} (--data, out of distribution)", False, str(path.resolve())))
    return out


def _write_phantom(out_dir: Path, n_slices: int, size: int, seed: int) -> Path:
    """A random 3D ellipsoid phantom ``[n_slices, size, size]`` written as NIfTI (1 mm voxels)."""
    from d3ip_cli.core.device import make_generator
    from d3ip_cli.core.types import Volume
    from d3ip_cli.io.volumes import write_volume
    from d3ip_cli.prior.phantoms import ellipsoid_volume

    data = ellipsoid_volume(n_slices, size, generator=make_generator(seed, "cpu")).numpy().astype(np.float32)
    vol = Volume(data=data, affine=np.eye(4), meta={"modality": "OT", "units": "a.u."})
    path = out_dir / "volumes" / f"phantom_{n_slices}x{size}x{size}_seed{seed}.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_volume(vol, path, overwrite=True, description="d3ip benchmark phantom")


def _n_slices(path: Path) -> int:
    from d3ip_cli.core.errors import FrameRequired
    from d3ip_cli.io.volumes import read_volume

    try:
        return read_volume(path).shape[0]
    except FrameRequired as exc:  # benchmark has no --frame: say how to make a 3D file of one frame
        raise FrameRequired(f"--data {path} is 4D with {exc.frames} frames: write one as a 3D file first "
                            f"(d3ip convert {path} --frame N -o frame.nii.gz) and benchmark that", exc.frames) from None


def plan_cases(suite: Suite, out_dir: Path, *, data: Sequence[str | os.PathLike] = (), methods: Sequence[str] | None = None,
               seed: int = 0) -> tuple[list[Case], list[str]]:
    """Resolve a suite into cases (writing the phantom volume under ``out_dir/volumes``).

    Returns ``(cases, notes)``; notes say what was left out (e.g. a missing example).
    ``methods`` (``--methods``) replaces every case's method list.
    """
    from d3ip_cli.engine.methods import get_method

    notes: list[str] = []
    volumes: dict[str, tuple[VolumeSpec, Path]] = {}
    specs: list[tuple[str, str, tuple[str, ...] | None, int]] = [
        (c.task, c.volume, c.methods, c.slices or suite.slices) for c in suite.cases]
    extra = data_volumes(data)
    for v in extra:
        volumes[v.id] = (v, Path(v.path))  # type: ignore[arg-type]
        specs += [(t, v.id, suite.data_methods, suite.slices) for t in suite.data_tasks]
    phantom_slices = max([n for _, vol_id, _, n in specs if vol_id == "phantom"], default=suite.slices)
    cases: list[Case] = []
    for task_id, vol_id, case_methods, n_slices in specs:
        setting = TASK_SETTINGS[task_id]
        if vol_id not in volumes:
            spec = VOLUMES[vol_id]
            if spec.kind == "phantom":
                path = _write_phantom(out_dir, phantom_slices + 3, suite.grid, seed)
            else:
                found = example_path()
                if found is None:
                    note = ("the bundled example examples/mni_t1.nii.gz was not found (run from a source checkout, "
                            "set D3IP_EXAMPLE, or pass it with --data): its cases are left out")
                    if note not in notes:
                        notes.append(note)
                    continue
                path = found
            volumes[vol_id] = (spec, path)
        spec, path = volumes[vol_id]
        start, stop, tune, held = choose_slab(_n_slices(path), n_slices)
        if not held:
            notes.append(f"{vol_id}: one slice only, so tv/l1-wavelet weights are tuned on the evaluated slice")
        wanted = list(methods) if methods else list(case_methods or suite.methods)
        wanted.sort(key=lambda m: ALL_METHODS.index(m) if m in ALL_METHODS else len(ALL_METHODS))
        run, skipped = [], []
        for m in wanted:
            meth = get_method(m)
            if setting.task not in meth.tasks:
                skipped.append({"method": meth.name, "reason": f"does not apply to {setting.task}"})
            else:
                run.append(meth.name)
        if not run:
            notes.append(f"{task_id}_{vol_id}: none of the methods applies to {setting.task}; case left out")
            continue
        cases.append(Case(f"{task_id}_{vol_id}", setting, spec, path, (start, stop), tune, held, run, skipped))
    return cases, notes


# ---------------------------------------------------------------------------------------
# peak memory
# ---------------------------------------------------------------------------------------


def _status_mb(field: str) -> float | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) / 1024.0 if m else None


class PeakMemory:
    """Per-run peak memory: ``with PeakMemory(device) as pm: ...; pm.result()``.

    Resets the kernel's resident high-water mark (Linux ``/proc/self/clear_refs``) and
    CUDA's peak counter on entry; falls back to ``ru_maxrss`` (process lifetime) elsewhere.
    """

    def __init__(self, device: Any = "cpu", fresh_process: bool = False) -> None:
        self.device = device
        self.fresh = fresh_process
        self.method = ("ru_maxrss of a fresh process per run" if fresh_process
                       else "ru_maxrss (process lifetime; not per run)")
        self.before: float | None = None

    def __enter__(self) -> "PeakMemory":
        import torch

        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            if _status_mb("VmHWM") is not None:
                self.method = ("a fresh process per run; VmHWM reset after imports and prior loading"
                               if self.fresh else "VmHWM reset per run (/proc/self/clear_refs), shared process")
        except OSError:
            pass
        self.before = _status_mb("VmRSS")
        dev = torch.device(self.device)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def result(self) -> dict[str, Any]:
        import torch

        peak = _status_mb("VmHWM") if "VmHWM" in self.method else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        out = {"peak_rss_mb": round(peak, 1), "rss_before_mb": None if self.before is None else round(self.before, 1),
               "peak_rss_delta_mb": None if self.before is None else round(max(peak - self.before, 0.0), 1),
               "peak_gpu_mb": None, "memory_method": self.method}
        dev = torch.device(self.device)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        return out


# ---------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunOutcome:
    row: dict[str, Any]
    center: np.ndarray | None = None
    """The slab's central slice of the reconstruction (for the montage)."""
    reference: np.ndarray | None = None
    memory_method: str | None = None


def _config(case: Case, method: str, suite: Suite, *, prior: str | None, seed: int, weight: float | None,
            slices: str) -> Any:
    from d3ip_cli.core.config import ReconConfig
    from d3ip_cli.engine.methods import get_method

    opts: dict[str, Any] = dict(task=case.setting.task, method=method, seed=seed, slices=slices, grid=suite.grid,
                                weight=weight, **case.setting.options, **suite.noise)
    m = get_method(method)
    if not m.classical:  # the suite's engine options that this method takes
        opts.update(prior=prior, preset=suite.preset, **{k: v for k, v in suite.engine.items() if k in m.defaults})
    return ReconConfig.from_options(**opts)


def _record(argv: list[str] | None, case: Case, method: str, suite: Suite, weight: float | None, stage: str) -> Any:
    from d3ip_cli.core.record import RunRecord

    rec = RunRecord("benchmark", argv=argv)
    rec["benchmark"] = {"suite": suite.name, "case": case.id, "method": method, "weight": weight, "stage": stage,
                        "in_distribution": case.volume.in_distribution}
    rec.add_input(case.path)
    return rec


def tune_weight(case: Case, method: str, suite: Suite, out_dir: Path, *, seed: int, device: Any,
                argv: list[str] | None = None) -> dict[str, Any]:
    """Pick ``--weight`` of ``method`` by PSNR on the case's held-out slice over ``suite.tune_grid``."""
    from d3ip_cli.engine import recon as engine
    from d3ip_cli.io.atomic import write_json

    grid = list(suite.tune_grid.get(method, ()))
    t0 = time.perf_counter()
    psnrs: list[float | None] = []
    for w in grid:
        cfg = _config(case, method, suite, prior=None, seed=seed, weight=w,
                      slices=f"{case.tune_slice}:{case.tune_slice + 1}")
        rec = _record(argv, case, method, suite, w, "tuning")
        res = engine.reconstruct(case.path, cfg, device=device, record=rec)
        m = res.metrics or {}
        psnrs.append(m.get("psnr") if not m.get("identical") else float("inf"))
        write_json(out_dir / "runs" / case.id / "tuning" / f"{method}_w{w:g}.json", rec.finish(), overwrite=True)
    scored = [(p, w) for p, w in zip(psnrs, grid) if p is not None]
    best = max(scored)[1] if scored else None
    return {"case": case.id, "method": method, "slice": case.tune_slice, "held_out": case.held_out, "weights": grid,
            "psnr": psnrs, "best": best, "time_s": round(time.perf_counter() - t0, 3)}


def run_case_method(case: Case, method: str, suite: Suite, out_dir: Path, *, prior: str | None, seed: int,
                    device: Any, weight: float | None = None, tuning_time: float | None = None,
                    argv: list[str] | None = None, isolate: bool = True) -> RunOutcome:
    """Reconstruct the case's slab with ``method``; write the volume and its run record; one result row.

    With ``isolate`` the run happens in a fresh process (forked by a ``multiprocessing`` fork
    server, or spawned), so its peak memory is its own; the child loads the prior and sets
    the parent's torch thread count before the timed part starts.
    """
    kwargs = dict(prior=prior, seed=seed, device=device, weight=weight, tuning_time=tuning_time, argv=argv)
    if not isolate:
        return _run_here(case, method, suite, out_dir, **kwargs)
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    import torch

    ctx = _process_context()
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            return pool.submit(_run_child, torch.get_num_threads(), case, method, suite, out_dir, kwargs).result()
    except BrokenProcessPool as exc:  # killed (e.g. by the kernel's out-of-memory killer)
        row = _blank_row(case, method, seed, device, weight, tuning_time)
        row.update(status="failed", error=f"the run's process died ({exc}); out of memory?")
        return RunOutcome(row)


PRELOAD = ["torch", "numpy", "scipy.stats", "skimage.metrics.simple_metrics", "skimage.metrics._structural_similarity",
           "skimage.transform", "nibabel", "sigpy.mri.app", "d3ip_cli.bench.metrics", "d3ip_cli.bench.runner",
           "d3ip_cli.engine.recon", "d3ip_cli.engine.methods", "d3ip_cli.engine.diffusion", "d3ip_cli.physics.registry",
           "d3ip_cli.physics.ct", "d3ip_cli.physics.mri", "d3ip_cli.baselines", "d3ip_cli.io.volumes",
           "d3ip_cli.io.nifti", "d3ip_cli.io.measurement"]
"""Modules the fork server imports once (missing ones are skipped), so that each run's process
starts in milliseconds instead of paying seconds of lazy imports (scipy.stats alone: ~1 s)."""


def _process_context() -> Any:
    """``forkserver`` (a clean server that has imported :data:`PRELOAD` but computed nothing forks
    each run's process: cheap, and no thread pools or allocator caches are inherited), else ``spawn``."""
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def _run_child(threads: int, case: Case, method: str, suite: Suite, out_dir: Path, kwargs: dict) -> RunOutcome:
    import torch

    torch.set_num_threads(threads)
    return _run_here(case, method, suite, out_dir, fresh_process=True, **kwargs)


def _blank_row(case: Case, method: str, seed: int, device: Any, weight: float | None,
               tuning_time: float | None) -> dict[str, Any]:
    row: dict[str, Any] = {k: None for k in ROW_COLUMNS}
    row.update(case=case.id, task=case.setting.task, setting=case.setting.label, volume=case.volume.id,
               in_distribution=case.volume.in_distribution, method=method, seed=seed, device=str(device),
               weight=weight, tuning_time_s=None if tuning_time is None else round(tuning_time, 3))
    return row


def _warm_up(method: str, prior: str | None, device: Any) -> None:
    """Pay one-time costs (prior loading, lazy imports) before the timed part of a run."""
    from d3ip_cli.engine.methods import get_method

    if not get_method(method).classical:
        _load_prior(prior, device)
    if method == "l1-wavelet":
        import sigpy.mri.app  # noqa: F401


def _run_here(case: Case, method: str, suite: Suite, out_dir: Path, *, prior: str | None, seed: int, device: Any,
              weight: float | None = None, tuning_time: float | None = None, argv: list[str] | None = None,
              fresh_process: bool = False) -> RunOutcome:
    from d3ip_cli.engine import recon as engine
    from d3ip_cli.io.atomic import remove_outputs, sidecar_path, write_json

    row = _blank_row(case, method, seed, device, weight, tuning_time)
    rel = Path("runs") / case.id / f"{method}.nii.gz"
    rec = _record(argv, case, method, suite, weight, "evaluation")
    try:
        cfg = _config(case, method, suite, prior=prior, seed=seed, weight=weight,
                      slices=f"{case.slab[0]}:{case.slab[1]}")
        _warm_up(method, prior, device)
        with PeakMemory(device, fresh_process) as pm:
            cpu0 = time.process_time()
            result = engine.reconstruct(case.path, cfg, device=device, record=rec)
            cpu = time.process_time() - cpu0
        mem = pm.result()
        path = engine.write_result(result, out_dir / rel, overwrite=True, record=rec)
        doc = rec.finish()
        doc["peak_memory_mb"] = mem["peak_rss_mb"]  # per run (finish() gives the process lifetime maximum)
        doc["memory"] = mem
        write_json(sidecar_path(path), doc, overwrite=True)
    except (KeyboardInterrupt, MemoryError):
        remove_outputs(rec)  # all or nothing: no reconstruction without its run record
        raise
    except Exception as exc:  # noqa: BLE001 - one failed run is a row, not the end of the benchmark
        remove_outputs(rec)
        msg = str(exc).splitlines()[0] if str(exc) else ""
        row.update(status="failed", error=msg if isinstance(exc, D3ipError) else f"{type(exc).__name__}: {msg}")
        return RunOutcome(row)
    m = result.metrics or {}
    stats = (doc.get("engine") or {}).get("stats") or {}
    vol = result.volume.data
    row.update(status="ok", shape="x".join(str(s) for s in vol.shape), psnr=m.get("psnr"), ssim=m.get("ssim"),
               nrmse=m.get("nrmse"), z_rel_l2=m.get("z_rel_l2"), data_range=m.get("data_range"),
               wall_time_s=doc["timings_s"].get("reconstruct"), cpu_time_s=round(cpu, 3),
               peak_rss_mb=mem["peak_rss_mb"],
               peak_rss_delta_mb=mem["peak_rss_delta_mb"], peak_gpu_mb=mem["peak_gpu_mb"],
               model_evaluations=doc.get("model_evaluations"), nfe_sample=stats.get("nfe_sample"),
               nfe_adapt=stats.get("nfe_adapt"), preset=(doc.get("config") or {}).get("preset"),
               record=str(rel) + ".json")
    ref = result.problem.reference
    zc = vol.shape[0] // 2
    return RunOutcome(row, vol[zc].copy(), None if ref is None else np.asarray(ref[zc]).copy(), mem["memory_method"])


def environment(device: Any) -> dict[str, Any]:
    """What the timings depend on: CPU, threads, torch, device."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if m:
            cpu = m.group(1).strip()
    env = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
           "python": platform.python_version(), "platform": platform.platform(), "d3ip": __version__,
           "device": str(device)}
    dev = torch.device(device)
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
    return env


def _prepare_dir(out_dir: Path, overwrite: bool) -> None:
    from d3ip_cli.bench.report import OUTPUT_FILES

    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"-o {out_dir} is a file; give a folder for the benchmark results")
    if out_dir.is_dir():
        ours = [n for n in OUTPUT_FILES if (out_dir / n).exists()]
        if ours and not overwrite:
            raise OutputError(f"{out_dir} already holds benchmark results ({', '.join(ours)}); use --overwrite")
        for name in ours:  # the previous results go now: a run that fails cannot leave them looking like its own
            with contextlib.suppress(FileNotFoundError):
                (out_dir / name).unlink()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputError(f"{out_dir} is not writable")


def _load_prior(prior: str | None, device: Any) -> dict[str, Any]:
    """Load the prior once, before any timed run (the engine caches it per process); its metadata."""
    import torch

    from d3ip_cli.engine.diffusion import load_prior_for
    from d3ip_cli.prior.checkpoint import bundled_prior_path

    if prior is None and not bundled_prior_path().exists():
        raise MissingComponentError(f"the bundled prior {bundled_prior_path()} is missing from this installation: "
                                    "pass --prior PATH, or --methods with classical methods only")
    if prior is not None and not Path(prior).is_file():
        from d3ip_cli.core.errors import InputDataError

        raise InputDataError(f"--prior {prior}: no such file")
    return load_prior_for(prior, torch.device(device))[1]


def _check_methods(methods: Iterable[str] | None) -> list[str] | None:
    from d3ip_cli.engine.methods import get_method

    if methods is None:
        return None
    names = [m.strip().lower() for m in methods if m and m.strip()]
    if not names:
        raise UsageError("--methods: name at least one method")
    for m in names:
        if m not in ALL_METHODS:
            raise UsageError(f"--methods: unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
        get_method(m)  # exit 6 when a planned method is not available
    return list(dict.fromkeys(names))


def run_benchmark(suite: Suite | str, out_dir: str | os.PathLike, *, data: Sequence[str | os.PathLike] = (),
                  methods: Sequence[str] | None = None, prior: str | None = None, seed: int = 0,
                  device: Any = "cpu", overwrite: bool = False, slices: int | None = None, grid: int | None = None,
                  preset: str | None = None,
                  progress: Progress | None = None, log: Log | None = None,
                  argv: list[str] | None = None, isolate: bool = True) -> dict[str, Any]:
    """Run a suite and write its outputs into ``out_dir``; return the ``results.json`` document.

    Options, methods and the prior are checked before ``out_dir`` is touched. An existing
    ``out_dir`` holding results (``results.json`` and the like) is refused unless
    ``overwrite``; its result files (``OUTPUT_FILES``) are then removed before the first run and
    its run files replaced in place (nothing else in the folder is deleted).

    Args:
        suite: a :class:`~d3ip_cli.bench.suites.Suite` or its name (``quick``, ``standard``, ``paper``).
        out_dir: the results folder (refused when it holds results, unless ``overwrite``).
        data: extra volumes (``--data``), run on ``suite.data_tasks``.
        methods: replaces the suite's methods (each still skipped where it does not apply).
        prior: prior file of the diffusion methods (default: the bundled prior).
        slices, grid: override the suite's slab size and in-plane grid.
        preset: override the suite's diffusion preset (fast, standard, paper).
        progress: ``progress(done, total, {"stage", "case", "method"})`` per run.
        log: receives one line per finished run.
        isolate: run each (case, method) in a fresh process (per-run peak memory);
            ``False`` runs them here (faster; peak memory then shares the process, see :class:`PeakMemory`).
    """
    from d3ip_cli.bench import report
    from d3ip_cli.engine.methods import get_method

    t_start = time.perf_counter()
    s = get_suite(suite) if isinstance(suite, str) else suite
    if slices is not None or grid is not None:
        if slices is not None and slices < 1:
            raise UsageError(f"--slices must be at least 1 (got {slices})")
        if grid is not None and grid < 8:
            raise UsageError(f"--grid must be at least 8 (got {grid})")
        cases = s.cases if slices is None else tuple(dataclasses.replace(c, slices=None) for c in s.cases)
        s = dataclasses.replace(s, slices=slices or s.slices, grid=grid or s.grid, cases=cases)
    if preset is not None:
        from d3ip_cli.engine.diffusion import PRESETS as DIFFUSION_PRESETS

        if preset not in DIFFUSION_PRESETS:
            raise UsageError(f"--preset {preset!r}: expected one of {', '.join(DIFFUSION_PRESETS)}")
        s = dataclasses.replace(s, preset=preset)
    overrides = [f"{k} {v}" for k, v in (("slices", slices), ("grid", grid), ("preset", preset)) if v is not None]
    if overrides:  # the suite's description names its own settings: say what this run changed
        s = dataclasses.replace(s, description=f"{s.description} (this run overrides: {', '.join(overrides)})")
    wanted = _check_methods(methods)
    candidates = set(wanted or [m for c in s.cases for m in (c.methods or s.methods)]
                     + (list(s.data_methods or s.methods) if data else []))
    for m in candidates:
        get_method(m)  # planned-but-missing methods fail now, not after an hour
    # everything that can be checked is checked before the results folder is touched
    prior_meta = _load_prior(prior, device) if any(not get_method(m).classical for m in candidates) else None
    data_volumes(data)  # a missing --data path fails here
    out = Path(out_dir)
    existed = out.exists()
    _prepare_dir(out, overwrite)
    say = log or (lambda _msg: None)
    try:
        cases, notes = plan_cases(s, out, data=data, methods=wanted, seed=seed)
    except BaseException:
        if not existed:  # e.g. an unreadable --data volume: leave no half-made results folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    if not cases:
        raise UsageError("nothing to run: no case of the suite is available" + (f" ({notes[0]})" if notes else ""))
    prior_info = None
    if prior_meta is not None:
        from d3ip_cli.prior.pretrain import totals

        prior_info = {k: prior_meta.get(k) for k in ("path", "sha256", "steps", "preset", "resolution", "architecture")}
        prior_info["total"] = totals(prior_meta)  # over all training stages (--init)

    total = sum(len(c.methods) + sum(len(s.tune_grid.get(m, ())) for m in c.methods if m in TUNED) for c in cases)
    done = 0
    rows: list[dict[str, Any]] = []
    tuning: list[dict[str, Any]] = []
    centers: dict[tuple[str, str], np.ndarray] = {}
    references: dict[str, np.ndarray] = {}
    mem_method: str | None = None

    def tick(case: Case, method: str, n: int = 1) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total, {"stage": "benchmark", "case": case.id, "method": method})

    for case in cases:
        say(f"case {case.id}: {case.setting.label} on {case.volume.id} "
            f"(slices {case.slab[0]}:{case.slab[1]} at {s.grid}x{s.grid}; tuning slice {case.tune_slice})")
        for method in case.methods:
            weight, ttime = None, None
            if method in TUNED and s.tune_grid.get(method):
                try:
                    tr = tune_weight(case, method, s, out, seed=seed, device=device, argv=argv)
                except (KeyboardInterrupt, MemoryError):
                    raise
                except Exception as exc:  # noqa: BLE001 - reported; the method then runs with its default
                    tr = {"case": case.id, "method": method, "error": f"{type(exc).__name__}: {exc}", "best": None}
                tuning.append(tr)
                grid_w = list(s.tune_grid[method])
                if tr.get("best") is not None and len(grid_w) > 1 and tr["best"] in (grid_w[0], grid_w[-1]):
                    notes.append(f"{case.id}: the tuned {method} weight {tr['best']:g} is at the edge of the grid "
                                 f"({grid_w[0]:g}..{grid_w[-1]:g})")
                weight, ttime = tr.get("best"), tr.get("time_s")
                tick(case, method, len(s.tune_grid[method]))
            outcome = run_case_method(case, method, s, out, prior=prior, seed=seed, device=device, weight=weight,
                                      tuning_time=ttime, argv=argv, isolate=isolate)
            row = outcome.row
            mem_method = outcome.memory_method or mem_method
            if weight is None and method in TUNED:
                row["weight"] = get_method(method).defaults.get("weight")
            rows.append(row)
            if outcome.center is not None:
                centers[(case.id, method)] = outcome.center
                if outcome.reference is not None:
                    references.setdefault(case.id, outcome.reference)
            tick(case, method)
            if row["status"] == "ok":
                psnr = "-" if row["psnr"] is None else f"{row['psnr']:.2f} dB"
                say(f"  {method:<11} PSNR {psnr}  SSIM {row['ssim'] if row['ssim'] is not None else '-'}  "
                    f"{row['wall_time_s']:.1f} s")
            else:
                say(f"  {method:<11} failed: {row['error']}")

    doc: dict[str, Any] = {
        "tool": "d3ip", "version": __version__, "command": "benchmark", "argv": argv,
        "suite": s.to_dict(), "seed": seed, "device": str(device), "environment": environment(device),
        "prior": prior_info, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cases": [c.to_dict() for c in cases], "tuning": tuning, "rows": rows,
        "skipped": [dict(case=c.id, **sk) for c in cases for sk in c.skipped],
        "notes": notes, "columns": ROW_COLUMNS,
        "memory_method": mem_method,
        "failed": sum(r["status"] != "ok" for r in rows),
    }
    doc["wall_time_s"] = round(time.perf_counter() - t_start, 2)
    doc["outputs"] = report.write_outputs(doc, out, centers=centers, references=references)
    doc["wall_time_s"] = round(time.perf_counter() - t_start, 2)
    report.write_json_last(doc, out)
    return doc


__all__ = ["ROW_COLUMNS", "Case", "choose_slab", "example_path", "data_volumes", "plan_cases", "PeakMemory",
           "RunOutcome", "tune_weight", "run_case_method", "environment", "run_benchmark"]
