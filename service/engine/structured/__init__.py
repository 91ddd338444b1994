"""Constrained decoding with llguidance: the request's constraint (spec), its compilation (compiler) and
the per-sequence matcher with its token masks (masking)."""
from service.engine.structured.spec import StructuredOutput

__all__ = ["StructuredOutput"]
