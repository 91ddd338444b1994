"""Which kernel runs each projection of a small decode batch on a GPU: cuBLAS, or model/kernels/gemv.py's
GEMV, alone or computing its own input (SwiGLU's product, or the residual add + RMSNorm before it).

Whether any configuration of the GEMV beats the unfused path depends on the card and the shape, so a
KernelPlan's `tune_model()` times them on the device at start-up (the CUDA graphs call it before capturing
each batch size): replayed from a CUDA graph, as a step runs them, over every weight of the same shape in
turn, as a step reads them (one weight alone would sit in L2 and flatter every candidate). Its `linear()`,
`silu_mul_linear()` and `add_norm_linear()` then use the winner for that (kind, shape, rows); anything
not tuned, or where the unfused path won, runs unfused, so a fused kernel only runs where it measured
faster. The choices live in the plan, which the model runner owns and hands to every forward.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.kernels.fused import add_rms_norm, silu_and_mul
from model.kernels.gemv import (ADD_NORM, CANDIDATES, LINEAR, MAX_ROWS, SILU_MUL, AddNorm, GemvConfig, add_norm_gemv,
                                gemv)

log = logging.getLogger("kvserve.kernel_plan")


def _plan_key(kind: str, weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> tuple:
    return (kind, weight.device, *weight.shape, weight.dtype, bias is not None, rows)


@dataclass
class TuneResult:
    kind: str
    shape: tuple[int, int]
    rows: int
    unfused_us: float  # per weight, reading each in turn: cuBLAS, after the input's own kernel if any
    best: GemvConfig | None  # None: the unfused path stays
    best_us: float
    weight_bytes: int


def _replay_time(run, repeats: int) -> float:
    """Median microseconds of `run` replayed from a CUDA graph, as a decode step runs it (launched one by
    one from Python, a Triton kernel's launch costs more host time than the kernel takes on the device)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compiles, and lets cuBLAS pick its kernel, before capturing
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def _agrees(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> bool:
    """Each output within rounding of the unfused path's (a 16-bit output: two steps of bfloat16 at the
    largest value), so a configuration this card or Triton version miscompiles is never chosen."""
    tolerance = 1e-4 if reference[0].dtype == torch.float32 else 1 / 64
    return all(float((out.float() - ref.float()).abs().max()) <= tolerance * float(ref.float().abs().max())
               for ref, out in zip(reference, outputs, strict=True))



class KernelPlan:
    """The Triton path of a forward: the projections' kernels as tuned on this device, and the unfused
    Triton elementwise kernels wherever no GEMV was chosen. A model given none runs plain torch ops."""

    def __init__(self, candidates: tuple[GemvConfig, ...] = CANDIDATES):
        """`candidates`: the GEMV configurations tuning may choose from (none: every projection stays unfused)."""
        self.candidates = candidates
        self._choices: dict[tuple, GemvConfig | None] = {}  # (kind, device, N, K, dtype, bias, rows) -> winner

    def set_plan(self, kind: str, weight: torch.Tensor, bias: torch.Tensor | None, rows: int,
                 config: GemvConfig | None) -> None:
        """Run `kind` projections with this weight's shape, dtype and bias at `rows` rows with `config`
        (None: unfused)."""
        self._choices[_plan_key(kind, weight, bias, rows)] = config

    def _planned(self, kind: str, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> GemvConfig | None:
        if x.shape[0] > MAX_ROWS or x.stride(1) != 1 or x.dtype != weight.dtype:
            return None
        return self._choices.get(_plan_key(kind, weight, bias, x.shape[0]))

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear(x, weight, bias)."""
        config = self._planned(LINEAR, x, weight, bias)
        return F.linear(x, weight, bias) if config is None else gemv(x, weight, bias, config)

    def silu_mul_linear(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """linear(silu(gate) * up) for h (T, 2K) laid out [gate | up]."""
        config = self._planned(SILU_MUL, h, weight, bias)
        if config is None:
            return self.linear(silu_and_mul(h), weight, bias)
        return gemv(h, weight, bias, config, silu_mul=True)

    def add_norm_linear(self, x: torch.Tensor, norm: AddNorm, weight: torch.Tensor,
                        bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, linear(RMSNorm(x + delta) * norm.weight)); x is the residual when norm.delta is None."""
        config = self._planned(ADD_NORM, x, weight, bias)
        if config is None:
            return self._add_norm_unfused(x, norm, weight, bias)
        return add_norm_gemv(x, norm, weight, bias, config)

    def _add_norm_unfused(self, x: torch.Tensor, norm: AddNorm, weight: torch.Tensor,
                          bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        residual, normed = add_rms_norm(x, norm.delta, norm.weight, norm.eps)
        return residual, self.linear(normed, weight, bias)

    def _runs(self, kind: str, weights, rows: int):
        """(unfused, fused(config)): what a step runs for `kind`, once per weight on random inputs; each
        returns the outputs (and for ADD_NORM the residuals) as one list."""
        weight = weights[0][0]
        k, device, dtype = weight.shape[1], weight.device, weight.dtype
        x = torch.randn(rows, 2 * k if kind == SILU_MUL else k, dtype=dtype, device=device)
        if kind == SILU_MUL:
            return (lambda: [self.linear(silu_and_mul(x), w, b) for w, b in weights],
                    lambda config: [gemv(x, w, b, config, silu_mul=True) for w, b in weights])
        if kind == ADD_NORM:
            norm = AddNorm(torch.randn(rows, k, dtype=dtype, device=device),
                           torch.rand(k, dtype=dtype, device=device), 1e-5)
            return (lambda: [t for w, b in weights for t in self._add_norm_unfused(x, norm, w, b)],
                    lambda config: [t for w, b in weights for t in add_norm_gemv(x, norm, w, b, config)])
        return (lambda: [F.linear(x, w, b) for w, b in weights],
                lambda config: [gemv(x, w, b, config) for w, b in weights])

    def tune(self, kind: str, weights: list[tuple[torch.Tensor, torch.Tensor | None]], rows: int,
             repeats: int = 5) -> TuneResult:
        """Time the unfused path and every GEMV configuration for `kind` on `rows` rows over `weights` (all
        of one shape, dtype and bias presence), record the fastest that computes the same values, and say
        what was measured. CUDA only; not while capturing. Tune LINEAR first: the unfused paths of the
        other kinds end in linear()."""
        weight = weights[0][0]
        unfused, fused = self._runs(kind, weights, rows)
        reference = unfused()
        unfused_us = _replay_time(unfused, repeats) / len(weights)
        best, best_us = None, unfused_us
        for config in self.candidates:
            if config.split > 1 and weight.shape[1] < 2 * config.block_k:
                continue
            try:
                if not _agrees(reference, fused(config)):
                    raise ValueError("its results differ from the unfused path's")
                took = _replay_time(lambda: fused(config), repeats) / len(weights)
            except Exception as exc:  # e.g. a configuration this card cannot compile: the others still compete
                log.warning("GEMV %s for %s %s x %d rows left out: %s", config, kind, tuple(weight.shape), rows, exc)
                continue
            if took < best_us:
                best, best_us = config, took
        self.set_plan(kind, weight, weights[0][1], rows, best)
        return TuneResult(kind, tuple(weight.shape), rows, unfused_us, best, best_us,
                          weight.numel() * weight.element_size())

    def tune_model(self, model: torch.nn.Module, row_counts: list[int]) -> list[TuneResult]:
        """tune() every shape of the model's nn.Linear layers, then its fused projections (the model's
        `fused_projections()`: (kind, nn.Linear) pairs), for each row count up to MAX_ROWS."""
        sites = [(LINEAR, m) for m in model.modules() if type(m) is torch.nn.Linear]
        sites += [(kind, m) for kind, m in getattr(model, "fused_projections", list)()
                  if type(m) is torch.nn.Linear]
        groups: dict[tuple, list] = {}
        for kind, module in sites:
            w, b = module.weight, module.bias
            groups.setdefault((kind, *w.shape, w.dtype, b is not None), []).append((w, b))
        results = []
        with torch.inference_mode():
            for (kind, *shape), weights in groups.items():
                for rows in [r for r in sorted(set(row_counts)) if r <= MAX_ROWS]:
                    try:
                        results.append(self.tune(kind, weights, rows))
                    except Exception:  # tuning is an optimisation: whatever breaks it leaves that projection unfused
                        log.exception("tuning %s %s x %d rows failed; it stays unfused", kind, shape[:2], rows)
        return results
