"""Typed, validated configurations built at the CLI boundary (pydantic).

Commands map their options onto these models with :meth:`_Config.from_options`; an
invalid value becomes a one-line :class:`~d3ip_cli.core.errors.UsageError` (exit 2)
naming the option, e.g. ``--views: must be greater than 0 (got 0)``. The library
re-checks what it depends on, so configs are a convenience, not the only guard.

``ReconConfig`` holds the task options, noise model and run settings of
``d3ip reconstruct``; engine settings (sampler, adaptation) are added by the engine.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from d3ip_cli.core.errors import UsageError

TaskName = Literal["sparse-view", "limited-angle", "cs-mri"]
BackendName = Literal["auto", "native", "torch-radon", "astra"]
MaskName = Literal["uniform1d", "gaussian1d", "poisson2d"]
NoiseName = Literal["none", "poisson", "gaussian"]


def parse_slices(text: str | None) -> tuple[int | None, int | None] | None:
    """``"A:B"`` -> ``(A, B)`` (half-open, 0-based; either end may be omitted); ``None`` -> ``None``."""
    if text is None or str(text).strip() == "":
        return None
    s = str(text).strip()
    if ":" not in s:
        raise ValueError(f"expected A:B (got {s!r})")
    a, b = s.split(":", 1)
    try:
        start = int(a) if a.strip() else None
        stop = int(b) if b.strip() else None
    except ValueError:
        raise ValueError(f"expected integers A:B (got {s!r})") from None
    if (start is not None and start < 0) or (stop is not None and stop < 0):
        raise ValueError(f"slice indices must be >= 0 (got {s!r})")
    if start is not None and stop is not None and stop <= start:
        raise ValueError(f"B must be greater than A (got {s!r})")
    return start, stop


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def from_options(cls, **options: Any) -> Any:
        """Build from CLI options; a validation failure is one ``UsageError`` line."""
        try:
            return cls(**options)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = "--" + str(err["loc"][0]).replace("_", "-") if err.get("loc") else "option"
            msg = err.get("msg", "invalid value")
            msg = msg[len("Value error, "):] if msg.startswith("Value error, ") else msg
            msg = msg.replace("Input should be", "must be").replace("Field required", "is required")
            if err.get("type") == "missing":
                raise UsageError(f"{loc} {msg}") from None
            if "(got" not in msg:
                msg += f" (got {err.get('input')!r})"
            raise UsageError(f"{loc}: {msg}") from None


class TaskOptions(_Config):
    """Task options shared by ``simulate`` and ``reconstruct`` (DESIGN §2, §3)."""

    task: Optional[TaskName] = None
    views: int = Field(60, gt=0, description="sparse-view: views uniform on [0, 180)")
    arc: float = Field(90.0, gt=0, le=180, description="limited-angle: arc in degrees, 1-degree steps")
    acceleration: float = Field(4.0, ge=1, description="cs-mri: undersampling factor R")
    mask: MaskName = "uniform1d"
    center_fraction: float = Field(0.08, ge=0, lt=1)
    coils: int = Field(1, ge=1, le=128)
    backend: BackendName = "auto"

    def operator_options(self) -> dict[str, Any]:
        """Keyword options for :func:`d3ip_cli.physics.registry.make_operator`."""
        if self.task in ("sparse-view", "limited-angle"):
            key = "views" if self.task == "sparse-view" else "arc"
            return {key: getattr(self, key), "backend": self.backend}
        return {"acceleration": self.acceleration, "mask": self.mask, "center_fraction": self.center_fraction,
                "coils": self.coils}


class NoiseOptions(_Config):
    """Measurement noise: CT photon counts (``poisson``, ``i0``) or ``gaussian`` (``sigma`` relative to the
    RMS of the noiseless data); MRI: complex ``gaussian`` only."""

    noise: NoiseName = "none"
    i0: float = Field(1e5, gt=0)
    sigma: float = Field(0.01, ge=0)


class SimulateConfig(TaskOptions, NoiseOptions):
    """``d3ip simulate``."""

    task: TaskName  # type: ignore[assignment]
    seed: int = 0
    slices: Optional[str] = None
    grid: Optional[int] = Field(None, ge=8, le=4096)
    series: Optional[str] = None
    frame: Optional[int] = Field(None, ge=0)

    @field_validator("slices")
    @classmethod
    def _slices(cls, v: Optional[str]) -> Optional[str]:
        parse_slices(v)
        return v


class ReconConfig(TaskOptions, NoiseOptions):
    """``d3ip reconstruct``: input, task, method and run settings."""

    method: str = "d3ip"
    prior: Optional[str] = None
    preset: Optional[Literal["fast", "standard", "paper"]] = None
    seed: int = 0
    samples: int = Field(1, ge=1, le=1000)
    weight: Optional[float] = Field(None, gt=0)
    weight_z: Optional[float] = Field(None, ge=0)
    filter: Optional[str] = None
    slices: Optional[str] = None
    grid: Optional[int] = Field(None, ge=8, le=4096)
    series: Optional[str] = None
    frame: Optional[int] = Field(None, ge=0)
    format: Optional[str] = None
    checkpoint_dir: Optional[str] = None
    resume: bool = False
    # diffusion engine settings (None: the preset's value); see d3ip_cli.engine.diffusion
    steps: Optional[int] = Field(None, ge=1, le=1000)
    t_start: Optional[int] = Field(None, ge=1, le=1000)
    eta: Optional[float] = Field(None, ge=0, le=1)
    adapt_iters: Optional[int] = Field(None, ge=0)
    adapt_batch: Optional[int] = Field(None, ge=1)
    lr: Optional[float] = Field(None, gt=0)
    lora_rank: Optional[int] = Field(None, ge=1, le=256)
    train_bias: Optional[bool] = None
    cg_iter: Optional[int] = Field(None, ge=0)
    fit: Optional[Literal["steps", "noise"]] = None
    tau: Optional[float] = Field(None, gt=0)
    gamma: Optional[float] = Field(None, gt=0)
    lam: Optional[float] = Field(None, ge=0)
    mbir_start: Optional[Literal["x0", "fit"]] = None
    checkpoint_every: Optional[int] = Field(None, ge=1)
    adapter: Optional[str] = None
    save_adapter: Optional[str] = None
    precision: Optional[Literal["fp32", "bf16", "auto"]] = None

    ENGINE_FIELDS: ClassVar[tuple[str, ...]] = ("steps", "t_start", "eta", "adapt_iters", "adapt_batch", "lr", "lora_rank",
                                                "train_bias", "cg_iter", "fit", "tau", "gamma", "lam", "mbir_start", "checkpoint_every", "adapter",
                                                "save_adapter", "precision")

    @field_validator("slices")
    @classmethod
    def _slices(cls, v: Optional[str]) -> Optional[str]:
        parse_slices(v)
        return v

    @field_validator("filter")
    @classmethod
    def _filter_name(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else v.strip().lower()

    @field_validator("method")
    @classmethod
    def _method_name(cls, v: str) -> str:
        v = v.strip().lower()
        if not v:
            raise ValueError("must name a method")
        return v
