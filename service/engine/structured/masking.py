"""A constrained sequence's grammar state, and the allowed-token masks of a step's constrained rows.

Each step the sampler asks `apply_grammar_masks` for its constrained rows only: llguidance fills one
bit per token id on the host (int32 words, ~6 KiB a row for a 49k vocabulary, well under a millisecond),
the words go to the logits' device, are unpacked there, and the disallowed tokens' logits become -inf.
The sampler does this after bias and penalties (which leave -inf as it is) and before temperature,
top-k/p and min-p, so those act on the allowed tokens only.
"""
from __future__ import annotations

import functools
import os

import llguidance
import llguidance.numpy
import numpy as np
import torch

from model.network.attention import to_device


class GrammarState:
    """One sequence's matcher: it has consumed exactly the sequence's output tokens so far."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.matcher = matcher
        self.mask_words = (vocab_size + 31) // 32  # the int32 words of one row's mask

    def consume(self, token: int) -> None:
        """Advance by one sampled token. A token the grammar refuses leaves the matcher in its error
        state (read through `error`); the mask makes that impossible short of a bug or a resource limit."""
        self.matcher.consume_token(token)

    @property
    def has_ended(self) -> bool:
        """It takes no further token: the grammar is complete (EOS consumed, or nothing can follow), or
        the matcher is in its error state."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str | None:
        if not self.matcher.is_error():
            return None
        return self.matcher.get_error() or "the grammar refused a token"


@functools.cache
def _executor() -> llguidance.LLExecutor:
    """llguidance's thread pool for filling several rows' masks at once (one per process, made on first use)."""
    return llguidance.LLExecutor(num_threads=min(4, os.cpu_count() or 1))


def apply_grammar_masks(logits: torch.Tensor, rows: list[int], states: list[GrammarState],
                        banned: list[list[int]]) -> None:
    """In place: in logits[rows[k]], every token states[k] does not allow is set to -inf. banned[k] are
    ids to refuse as well (stop ids under min_tokens) unless nothing else is allowed: the grammar wins."""
    words = np.zeros((len(rows), max(s.mask_words for s in states)), dtype=np.int32)
    if len(states) == 1:
        llguidance.numpy.fill_next_token_bitmask(states[0].matcher, words)
    else:
        llguidance.numpy.fill_next_token_bitmask_par(_executor(), [(s.matcher, k) for k, s in enumerate(states)],
                                                     words)
    for k, ids in enumerate(banned):
        if ids:
            _clear_unless_empty(words[k], ids)
    # A matcher that failed while computing its mask allows nothing; leave that row unmasked so the
    # numbers stay finite. The token it samples puts the matcher in its error state, which ends the sequence.
    words[~words.any(axis=1)] = -1
    allowed = _unpack(to_device(words, logits.device, torch.int32), logits.shape[1])
    index = to_device(rows, logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


def _clear_unless_empty(row_words: np.ndarray, ids: list[int]) -> None:
    before = row_words.copy()
    bits = row_words.view(np.uint32)
    for token in ids:
        if 0 <= token < bits.size * 32:
            bits[token // 32] &= np.uint32(~(1 << (token % 32)) & 0xFFFFFFFF)
    if not row_words.any():
        row_words[:] = before


def _unpack(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """(n, W) int32 bit words -> (n, vocab) bool, bit j of word w being token 32 * w + j."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = ((words[:, :, None] >> shifts) & 1).bool().reshape(words.shape[0], -1)  # (n, 32 W)
    if bits.shape[1] < vocab:  # a padded output head: its extra columns are never allowed
        bits = torch.cat([bits, bits.new_zeros(bits.shape[0], vocab - bits.shape[1])], dim=1)
    return bits[:, :vocab]
