"""Safetensors checkpoints of the prior (never pickle).

A *prior file* holds the EMA weights of the U-Net plus a JSON header under the
metadata key ``"d3ip"``::

    {"format": "d3ip-prior", "version": ..., "architecture": {...UNetConfig...},
     "schedule": {...}, "resolution": 128, "data": {"recipe": {...}, "seed": 0},
     "steps": N, "images_seen": N, "loss": {...summary...}, "prediction": "eps" | "v",
     "data_range": [0, 1], "model_range": [-1, 1]}

The training state (for ``--resume``) lives beside it as ``PRIOR.state.safetensors``
with the live weights, EMA, optimiser moments and the loss history.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from d3ip_cli.core.errors import InputDataError
from d3ip_cli.prior.network import UNet, UNetConfig

FORMAT = "d3ip-prior"
METADATA_KEY = "d3ip"
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_safetensors(path: Path, what: str = "prior") -> None:
    if not path.exists():
        raise InputDataError(f"{what} {path} does not exist")
    if path.is_dir():
        raise InputDataError(f"{what} {path} is a directory, expected a .safetensors file")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:2] in _PICKLE_MAGIC[:4] or head[:4] == _PICKLE_MAGIC[4]:
        raise InputDataError(f"{path} is a pickle/torch.save file; d3ip loads safetensors only (pickles can run code)")
    if len(head) < 8:
        raise InputDataError(f"{path} is not a safetensors file (too short)")
    n = int.from_bytes(head, "little")
    if n <= 1 or n > 100_000_000 or n > path.stat().st_size:
        raise InputDataError(f"{path} is not a safetensors file (bad header)")


def read_metadata(path: str | os.PathLike, what: str = "prior") -> dict[str, Any]:
    """The JSON header of a d3ip safetensors file."""
    from safetensors import safe_open

    p = Path(path)
    _check_safetensors(p, what)
    try:
        with safe_open(str(p), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise InputDataError(f"{p} is not a readable safetensors file: {exc}") from None
    if METADATA_KEY not in meta:
        raise InputDataError(f"{p} has no d3ip metadata header (not a d3ip prior/adapter)")
    try:
        return json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError:
        raise InputDataError(f"{p} has a corrupt d3ip metadata header") from None


def load_tensors(path: str | os.PathLike, what: str = "prior") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All tensors and the d3ip metadata of a safetensors file (checked, never unpickled)."""
    from safetensors.torch import load_file

    meta = read_metadata(path, what)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise InputDataError(f"{path} is corrupt: {exc}") from None
    return tensors, meta


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write tensors + metadata atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    from d3ip_cli.core.errors import OutputError
    from d3ip_cli.io.atomic import partial_path, remove_stale_partials

    p = Path(path)
    remove_stale_partials(p)
    tmp = partial_path("", p)  # a name of this process's own: two writers never share one
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={METADATA_KEY: json.dumps(meta)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # readable like any file the user writes (safetensors makes it 0600)
        os.replace(tmp, p)
    except Exception as exc:  # noqa: BLE001 - safetensors reports I/O failures as its own error type
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":
            raise OutputError(f"cannot write {p}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
        raise


def save_prior(path: str | os.PathLike, model: UNet, meta: dict[str, Any], dtype: torch.dtype = torch.float32) -> None:
    """Save a prior file: the given (EMA) model's weights + the metadata header."""
    meta = dict(meta, format=FORMAT, architecture=model.config.to_dict(), weights_dtype=str(dtype).replace("torch.", ""))
    save_tensors(path, {k: v.to(dtype) for k, v in model.state_dict().items()}, meta)


def load_prior(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[UNet, dict[str, Any]]:
    """Load a prior file -> (UNet in eval mode, metadata incl. ``sha256`` and ``path``)."""
    tensors, meta = load_tensors(path)
    if meta.get("format") != FORMAT:
        raise InputDataError(f"{path} is not a d3ip prior (format {meta.get('format')!r})")
    try:
        model = UNet(UNetConfig.from_dict(meta["architecture"]))
        model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        first = str(exc).splitlines()[0][:200]
        raise InputDataError(f"{path}: weights do not match the architecture in its header ({first})") from None
    from d3ip_cli.prior.schedule import schedule_metadata

    if meta.get("schedule", schedule_metadata()) != schedule_metadata():  # the samplers use the fixed schedule
        raise InputDataError(f"{path} was trained with another noise schedule ({meta['schedule']}); "
                             f"d3ip samples with {schedule_metadata()}")
    meta = dict(meta, sha256=file_sha256(path), path=str(Path(path).resolve()))
    return model.to(device).eval(), meta


def bundled_prior_path() -> Path:
    """The default prior shipped with the package."""
    return Path(__file__).parent / "weights" / "phantom_cpu.safetensors"
