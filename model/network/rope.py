"""RoPE's frequencies, with the context-extension scalings checkpoints name in their config.

Every scaling changes only the per-channel inverse frequencies (and, for YaRN, a factor on cos/sin);
positions and the rotation itself are as in plain RoPE:
  linear   positions divided by `factor` (every frequency / factor)
  llama3   Llama 3.1's blend: long wavelengths (beyond original_max / low_freq_factor) / factor, short ones
           (below original_max / high_freq_factor) unchanged, a linear blend between
  yarn     YaRN: frequencies that rotate fewer than beta_slow times over the original context are
           interpolated (/ factor), those rotating more than beta_fast times kept, a ramp between; cos and
           sin scaled by the attention factor (0.1 ln(factor) + 1 unless the config gives one)
  factors  one divisor per frequency, as GGUF files store Llama 3.1's scaling (the rope_freqs tensor
           llama.cpp's converter computes from the llama3 parameters)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCALINGS = ("linear", "llama3", "yarn")  # the names configs use
KINDS = SCALINGS + ("factors",)


@dataclass(frozen=True)
class RopeScaling:
    kind: str  # one of SCALINGS
    factor: float
    original_max_position: int = 0  # llama3, yarn: the context the model was trained on
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn: None means 0.1 ln(factor) + 1
    frequency_factors: tuple[float, ...] = ()  # factors: one per frequency (head_dim / 2)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"RoPE scaling {self.kind!r} is not supported (supported: {', '.join(SCALINGS)})")
        if self.factor <= 0:
            raise ValueError(f"RoPE scaling factor must be positive, got {self.factor}")
        if self.kind in ("llama3", "yarn") and self.original_max_position <= 0:
            raise ValueError(f"RoPE scaling {self.kind!r} needs original_max_position_embeddings")

    @property
    def magnitude(self) -> float:
        """The factor on cos and sin (1 except for YaRN)."""
        if self.kind != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """(head_dim / 2,) float64 inverse frequencies, scaled as the config says."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / theta ** exponents
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "factors":
        if len(scaling.frequency_factors) != len(inv_freq):
            raise ValueError(f"{len(scaling.frequency_factors)} RoPE frequency factors for {len(inv_freq)} frequencies")
        return inv_freq / torch.tensor(scaling.frequency_factors, dtype=torch.float64)
    if scaling.kind == "llama3":
        return _llama3(inv_freq, scaling)
    return _yarn(inv_freq, head_dim, theta, scaling)


def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    wavelength = 2 * math.pi / inv_freq
    long_limit = s.original_max_position / s.low_freq_factor  # longer wavelengths: interpolated
    short_limit = s.original_max_position / s.high_freq_factor  # shorter ones: kept
    blend = (s.original_max_position / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - blend) * inv_freq / s.factor + blend * inv_freq
    return torch.where(wavelength > long_limit, inv_freq / s.factor,
                       torch.where(wavelength < short_limit, inv_freq, blended))


def _yarn(inv_freq: torch.Tensor, head_dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    def channel(rotations: float) -> float:
        """The channel pair that turns `rotations` times over the original context."""
        return head_dim * math.log(s.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(channel(s.beta_fast)), 0)
    high = min(math.ceil(channel(s.beta_slow)), head_dim - 1)
    span = (high - low) or 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / span).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (the frequency as trained), 0: interpolate (/ factor)
    return inv_freq / s.factor * (1 - keep) + inv_freq * keep


def rope_scaling_from_hf(raw: dict | None, max_position: int) -> RopeScaling | None:
    """A config.json's rope_scaling, or None for none ("default"); unknown kinds raise ValueError."""
    if not raw:
        return None
    kind = raw.get("rope_type", raw.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in SCALINGS:
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: {', '.join(SCALINGS)})")
    return RopeScaling(kind, float(raw["factor"]),
                       int(raw.get("original_max_position_embeddings") or (max_position if kind == "yarn" else 0)),
                       float(raw.get("low_freq_factor", 1.0)), float(raw.get("high_freq_factor", 4.0)),
                       float(raw.get("beta_fast", 32.0)), float(raw.get("beta_slow", 1.0)),
                       raw.get("attention_factor"))
