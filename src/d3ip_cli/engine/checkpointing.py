"""Sampler checkpoints for ``reconstruct --checkpoint-dir DIR [--resume]`` (DESIGN §6).

The complete sampler state — the current ``x_t``, the step, the adapter, the random
generator, finished slices of per-slice methods, statistics — is written atomically
(safetensors, never pickle) every few steps as ``DIR/state-rank{r}.safetensors``.
Its header records a *run key*: a hash of the input measurement, the method and every
setting that changes the result. ``--resume`` refuses a checkpoint whose key differs
(another input or configuration) and otherwise continues; on CPU the result is bitwise
identical to an uninterrupted run with the same seed.

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


def run_key(y: torch.Tensor, method: str, settings: dict[str, Any], extra: dict[str, Any]) -> str:
    """A hash of the measurement bytes and everything that determines the result."""
    h = hashlib.sha256()
    yc = y.detach().cpu().contiguous()
    if yc.is_complex():
        yc = torch.view_as_real(yc)
    h.update(yc.numpy().tobytes())
    h.update(json.dumps({"method": method, "settings": settings, **extra}, sort_keys=True, default=str).encode())
    return h.hexdigest()


class Checkpointer:
    """Saves/loads sampler states in ``directory`` for one rank; watches for SIGTERM/SIGINT."""

    def __init__(self, directory: str | os.PathLike, key: str, *, every: int = 5, rank: int = 0,
                 resume: bool = False) -> None:
        self.dir = Path(directory)
        self.key = key
        self.every = max(1, int(every))
        self.rank = rank
        self.resume = resume
        self.stop_requested = False
        self._old_handlers: dict[int, Any] = {}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            from d3ip_cli.core.errors import OutputError

            raise OutputError(f"--checkpoint-dir {self.dir}: {exc.strerror or exc}") from None

    @property
    def path(self) -> Path:
        return self.dir / f"state-rank{self.rank}.safetensors"

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
        from d3ip_cli.prior.checkpoint import save_tensors

        save_tensors(self.path, tensors, dict(meta, format=FORMAT, run_key=self.key))

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The saved state when resuming (None when there is none to resume from)."""
        if not self.resume:
            return None
        if not self.path.exists():
            raise InputDataError(f"--resume: no checkpoint at {self.path}")
        from d3ip_cli.prior.checkpoint import load_tensors

        tensors, meta = load_tensors(self.path)
        if meta.get("format") != FORMAT:
            raise InputDataError(f"--resume: {self.path} is not a d3ip sampler checkpoint")
        if meta.get("run_key") != self.key:
            raise InputDataError(f"--resume: the checkpoint in {self.dir} belongs to another input or configuration; "
                                 "refusing to mix runs (use a new --checkpoint-dir)")
        return tensors, meta

    def check_stop(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Save and raise :class:`Interrupted` when a stop signal arrived."""
        if self.stop_requested:
            self.save(tensors, meta)
            raise Interrupted(f"interrupted; checkpoint saved in {self.dir} (continue with --resume)")

    def clear(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def rng_tensor(generator: torch.Generator) -> torch.Tensor:
    return generator.get_state().clone()


def set_rng(generator: torch.Generator, state: torch.Tensor) -> None:
    generator.set_state(state.to(torch.uint8).cpu())
