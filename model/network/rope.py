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
  dynamic  dynamic NTK: past the original context, the base grows with the sequence's length L,
           theta * (factor L / original - factor + 1) ^ (d / (d - 2))
  longrope Phi-3's: one divisor per frequency, the short list while the sequence is within the original
           context and the long one beyond it; cos and sin scaled by sqrt(1 + ln(max / original) / ln(original))

The last two depend on how long the sequence is when a token is computed, as transformers computes them:
each step's tokens are rotated for their sequence's length at that step, and the keys already cached keep
the rotation they were written with. So a prompt prefilled in chunks, or a prefix reused from the cache,
may be rotated differently from one prefilled whole, as in transformers' own cached generation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCALINGS = ("linear", "llama3", "yarn", "dynamic", "longrope")  # the names configs use
KINDS = SCALINGS + ("factors",)
LENGTH_DEPENDENT = ("dynamic", "longrope")


@dataclass(frozen=True)
class RopeScaling:
    kind: str  # one of SCALINGS
    factor: float
    original_max_position: int = 0  # llama3, yarn: the context the model was trained on
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn: None means 0.1 ln(factor) + 1; longrope: the cos/sin factor
    frequency_factors: tuple[float, ...] = ()  # factors: one per frequency (head_dim / 2); longrope: the short list
    long_factors: tuple[float, ...] = ()  # longrope: the list past the original context

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"RoPE scaling {self.kind!r} is not supported (supported: {', '.join(SCALINGS)})")
        if self.factor <= 0:
            raise ValueError(f"RoPE scaling factor must be positive, got {self.factor}")
        if self.kind in ("llama3", "yarn", "dynamic", "longrope") and self.original_max_position <= 0:
            raise ValueError(f"RoPE scaling {self.kind!r} needs original_max_position_embeddings")
        if self.kind == "longrope" and len(self.frequency_factors) != len(self.long_factors):
            raise ValueError("longrope needs short_factor and long_factor lists of one length")

    @property
    def length_dependent(self) -> bool:
        return self.kind in LENGTH_DEPENDENT

    @property
    def magnitude(self) -> float:
        """The factor on cos and sin (1 except for YaRN and longrope)."""
        if self.kind == "longrope":
            return self.attention_factor if self.attention_factor is not None else 1.0
        if self.kind != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """(head_dim / 2,) float64 inverse frequencies, scaled as the config says."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / theta ** exponents
    if scaling is None or scaling.kind == "dynamic":  # dynamic: as trained, within the original context
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind in ("factors", "longrope"):  # longrope: the short list, within the original context
        if len(scaling.frequency_factors) != len(inv_freq):
            raise ValueError(f"{len(scaling.frequency_factors)} RoPE frequency factors for {len(inv_freq)} frequencies")
        return inv_freq / torch.tensor(scaling.frequency_factors, dtype=torch.float64)
    if scaling.kind == "llama3":
        return _llama3(inv_freq, scaling)
    return _yarn(inv_freq, head_dim, theta, scaling)


def inverse_frequencies_at(head_dim: int, theta: float, scaling: RopeScaling, lengths: torch.Tensor) -> torch.Tensor:
    """(N, head_dim / 2) float64 inverse frequencies for sequences of the given lengths (N,), for the
    scalings whose frequencies depend on it (LENGTH_DEPENDENT)."""
    lengths = lengths.to(torch.float64)[:, None]
    exponents = (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)[None, :]
    original = scaling.original_max_position
    if scaling.kind == "dynamic":
        grown = scaling.factor * lengths.clamp(min=original) / original - (scaling.factor - 1)
        return 1.0 / (theta * grown ** (head_dim / (head_dim - 2))) ** exponents
    factors = torch.where(lengths > original, torch.tensor(scaling.long_factors, dtype=torch.float64),
                          torch.tensor(scaling.frequency_factors, dtype=torch.float64))
    return 1.0 / (factors * theta ** exponents)


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


def rope_scaling_from_hf(raw: dict | None, max_position: int,
                         original_max_position: int | None = None) -> RopeScaling | None:
    """A config.json's rope_scaling, or None for none ("default"); unknown kinds raise ValueError.
    original_max_position: the config's top-level original_max_position_embeddings (Phi-3 keeps it there)."""
    if not raw:
        return None
    kind = raw.get("rope_type", raw.get("type"))
    kind = "longrope" if kind == "su" else kind  # Phi-3's first name for it
    if kind in (None, "default"):
        return None
    if kind not in SCALINGS:
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: {', '.join(SCALINGS)})")
    if kind == "longrope":
        original = original_max_position or max_position
        stretch = max_position / original
        attention = raw.get("attention_factor")
        if attention is None:
            attention = math.sqrt(1 + math.log(stretch) / math.log(original)) if stretch > 1 else 1.0
        return RopeScaling(kind, stretch, original, attention_factor=attention,
                           frequency_factors=tuple(raw["short_factor"]), long_factors=tuple(raw["long_factor"]))
    if kind == "dynamic":  # transformers grows the base past max_position_embeddings itself
        return RopeScaling(kind, float(raw["factor"]), max_position)
    return RopeScaling(kind, float(raw["factor"]),
                       int(raw.get("original_max_position_embeddings") or (max_position if kind == "yarn" else 0)),
                       float(raw.get("low_freq_factor", 1.0)), float(raw.get("high_freq_factor", 4.0)),
                       float(raw.get("beta_fast", 32.0)), float(raw.get("beta_slow", 1.0)),
                       raw.get("attention_factor"))
