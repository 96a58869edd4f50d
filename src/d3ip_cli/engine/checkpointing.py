"""Sampler checkpoints for ``reconstruct --checkpoint-dir DIR [--resume]`` (DESIGN §6).

The complete sampler state — the current ``x_t``, the step, the adapter, the random
generator, finished slices of per-slice methods, statistics — is written atomically
(safetensors, never pickle; temporary file then rename) every few steps as
``DIR/state-rank{r}.safetensors``; the one before it is kept as
``DIR/state-rank{r}.prev.safetensors``. There is no optimiser state to save: the
adaptation starts a fresh AdamW at every sampling step (DESIGN §6).

Its header records a *run key*: a hash of the input measurement, the method and every
setting that changes the result (not the memory-dependent network chunk). ``--resume``
refuses a checkpoint whose key differs (another input or configuration: exit 3) and
otherwise continues; on CPU the result is bitwise identical to an uninterrupted run with
the same seed (the resumed run evaluates the network in the same slice chunks as before,
unless less memory is free now and a smaller chunk is needed).

Under ``torchrun`` the ranks of a shared-adapter run move in lockstep, so they must
resume from the *same* step: a hard kill (SIGKILL, node failure) can land between two
ranks' saves, which is why the previous generation is kept; :meth:`Checkpointer.load`
with ``agree=True`` picks the newest step that every rank holds. A stop request is also
agreed on (one all-reduce per step), so all ranks save the same step.

SIGTERM/SIGINT set a flag; the sampler saves a checkpoint at the next step boundary and
the run stops with :class:`~d3ip_cli.core.errors.Interrupted` (exit 130).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import torch

from d3ip_cli.core.errors import InputDataError, Interrupted

FORMAT = "d3ip-sampler-state"


def run_identity(y: torch.Tensor, method: str, settings: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines the result, as JSON values: the measurement's SHA-256, the method,
    the settings and ``extra`` (seed, prior, ranks, ...)."""
    yc = y.detach().cpu().contiguous()
    if yc.is_complex():
        yc = torch.view_as_real(yc)
    doc = {"measurement_sha256": hashlib.sha256(yc.numpy().tobytes()).hexdigest(), "method": method,
           "settings": settings, **extra}
    return json.loads(json.dumps(doc, sort_keys=True, default=str))


def run_key(identity: dict[str, Any]) -> str:
    """The hash a checkpoint must match to be resumed."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def identity_differences(theirs: dict[str, Any] | None, ours: dict[str, Any]) -> str:
    """``"seed 0 (now 1), --steps 20 (now 8)"``: what differs between two run identities."""
    if not isinstance(theirs, dict):
        return "a checkpoint of an older version, which does not say"
    names = {"measurement_sha256": "the measurement (another input, slab, grid or acquisition)", "world": "ranks"}
    out = []
    for k in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(k), ours.get(k)
        if k == "settings" and isinstance(a, dict) and isinstance(b, dict):
            out += [f"--{n.replace('_', '-')} {a.get(n)!r} (now {b.get(n)!r})" for n in sorted(set(a) | set(b))
                    if a.get(n) != b.get(n)]
        elif a != b:
            out.append(names[k] if k == "measurement_sha256" else f"{names.get(k, k)} {a!r} (now {b!r})")
    return ", ".join(out) or "nothing visible"


class Checkpointer:
    """Saves/loads sampler states in ``directory`` for one rank; watches for SIGTERM/SIGINT."""

    def __init__(self, directory: str | os.PathLike, identity: dict[str, Any], *, every: int = 5, rank: int = 0,
                 resume: bool = False) -> None:
        self.dir = Path(directory)
        self.identity = identity
        self.key = run_key(identity)
        self.every = max(1, int(every))
        self.rank = rank
        self.resume = resume
        self.stop_requested = False
        self._saved_at: int | None = None
        self._old_handlers: dict[int, Any] = {}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            from d3ip_cli.core.errors import OutputError
            from d3ip_cli.io.atomic import os_error_text

            raise OutputError(f"--checkpoint-dir {self.dir}: {os_error_text(exc)}") from None

    @property
    def path(self) -> Path:
        return self.dir / f"state-rank{self.rank}.safetensors"

    @property
    def prev_path(self) -> Path:
        return self.dir / f"state-rank{self.rank}.prev.safetensors"

    def exists(self) -> bool:
        return self.path.exists() or self.prev_path.exists()

    # -- signals -------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def handler(signum, frame):  # noqa: ARG001
            self.stop_requested = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old_handlers[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass

    def restore_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    # -- state ---------------------------------------------------------------------------
    def save(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Write the state atomically; the previous state becomes ``.prev``."""
        from d3ip_cli.prior.checkpoint import save_tensors

        tmp = self.dir / f".d3ip-next-{self.path.name}"
        save_tensors(tmp, tensors, dict(meta, format=FORMAT, run_key=self.key, run_identity=self.identity))
        if self.path.exists():
            os.replace(self.path, self.prev_path)
        os.replace(tmp, self.path)  # a kill between the two renames leaves .prev (found by load)
        self._saved_at = position(meta)

    def _read(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        if not path.exists():
            return None
        from d3ip_cli.prior.checkpoint import load_tensors

        try:
            tensors, meta = load_tensors(path)
        except InputDataError as exc:
            raise InputDataError(f"--resume: {path} is unreadable ({exc})") from None
        if meta.get("format") != FORMAT:
            raise InputDataError(f"--resume: {path} is not a d3ip sampler checkpoint")
        if meta.get("run_key") != self.key:
            diff = identity_differences(meta.get("run_identity"), self.identity)
            raise InputDataError(f"--resume: the checkpoint in {self.dir} belongs to another input or configuration "
                                 f"({diff}); refusing to mix runs (use a new --checkpoint-dir)")
        return tensors, meta

    def load(self, agree: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The saved state when resuming (None when there is none to resume from).

        With ``agree`` (ranks in lockstep under torchrun; every rank must call it) all
        ranks return the state of the same step: the newest one that every rank holds.
        """
        if not self.resume:
            return None
        cur, prev = self._read(self.path), self._read(self.prev_path)
        if cur is None and prev is None:
            raise InputDataError(f"--resume: no checkpoint at {self.path}")
        chosen = cur if cur is not None else prev
        if agree:
            from d3ip_cli.engine.distributed import all_reduce_int

            have = {position(s[1]): s for s in (cur, prev) if s is not None}
            common = all_reduce_int(max(have), "min")
            ok = all_reduce_int(int(common in have), "min")
            if not ok:
                raise InputDataError(f"--resume: the ranks' checkpoints in {self.dir} do not share a step "
                                     "(saved with another --checkpoint-every?); use a new --checkpoint-dir")
            chosen = have[common]
        return chosen

    def check_stop(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], agree: bool = False) -> None:
        """Save and raise :class:`Interrupted` when a stop signal arrived (on any rank, with ``agree``)."""
        stop = self.stop_requested
        if agree:
            from d3ip_cli.engine.distributed import all_reduce_int

            stop = bool(all_reduce_int(int(stop), "max"))
        if stop:
            if self._saved_at != position(meta):  # not just saved: keep .prev one generation older
                self.save(tensors, meta)
            raise Interrupted(f"interrupted; checkpoint saved in {self.dir} (continue with --resume)")

    def clear(self) -> None:
        for p in (self.path, self.prev_path):
            try:
                p.unlink()
            except FileNotFoundError:
                pass


def position(meta: dict[str, Any]) -> int:
    """How far a saved state is: the sampling step, or the last finished slice of a per-slice method."""
    return int(meta.get("step", meta.get("slice", -1)))


def rng_tensor(generator: torch.Generator) -> torch.Tensor:
    return generator.get_state().clone()


def set_rng(generator: torch.Generator, state: torch.Tensor) -> None:
    generator.set_state(state.to(torch.uint8).cpu())
