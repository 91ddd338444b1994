"""Cached decoding equals full recompute (DESIGN decision 5), for every architecture family.

The bug class guarded here is the "mask direction" family: a causal mask flipped or off by one, a
decode row that cannot see its own key, positions restarting at 0 for a later chunk, a sliding window
applied on one path but not the other, a slot mapping that reads another sequence's blocks. Each of
them changes logits far beyond ATOL, which the negative controls below demonstrate.
"""
from __future__ import annotations

import functools

import pytest
import torch

from model.config import tiny
from model.loading import build_model
from model.loading.weights import random_weights
from model.network.attention import AttentionMetadata, allocate_kv_cache
from model.network.transformer import Transformer
from tests.native_cpu import needs_native

# fp32 on CPU: cached and uncached paths differ only by summation order (~2e-6 on logits of ~2).
ATOL = 1e-5
# A wrong mask moves logits by >1e-2 on these models (see get_model); far above ATOL.
CLEARLY_DIFFERENT = 1e-3

FAMILIES = {
    "gpt2": tiny("gpt2"),  # learned positions, LayerNorm, GELU-tanh, biases, MHA, tied head
    "llama-gqa": tiny("smollm2-135m"),  # RoPE, RMSNorm, SwiGLU, 4 query heads over 2 KV heads
    "transformer-2017": tiny("transformer-2017"),  # post-norm, sinusoidal, ReLU
    "mistral-window": tiny("mistral-7b"),  # GQA + sliding window of 8, untied head
    "mqa": tiny("smollm2-135m", num_kv_heads=1),
    "gelu": tiny("gpt2", activation="gelu"),  # exact erf GELU, not the tanh approximation
}


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield


@functools.cache
def get_model(family: str):
    config = FAMILIES[family]
    # Under GPT-2's N(0, 0.02) init a token moves later logits by only ~5e-5 in the post-norm model
    # (the unit-sized sinusoid drowns the token embedding), too close to ATOL for a mask bug to show.
    # Matrices at 4x that scale make every token move every later logit by > 1e-2 in all families.
    weights = {name: w * 4 if w.dim() == 2 else w for name, w in random_weights(config, seed=1).items()}
    return build_model(config, weights, f"random:{family}")


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def full_logits(model, tokens: list[int]) -> torch.Tensor:
    """(T, vocab) logits of every position from one uncached forward: the reference."""
    meta = AttentionMetadata.build([len(tokens)], [len(tokens)], None, sliding_window=model.config.sliding_window)
    return model(torch.tensor(tokens), meta, None, logits_index=torch.arange(len(tokens)))


def without_window(model):
    """The same weights in a model whose config has no sliding window."""
    unwindowed = Transformer(model.config.replace(sliding_window=None))
    unwindowed.load_state_dict(model.state_dict())
    return unwindowed.eval()


class PagedRun:
    """Sequences decoded through a paged KV cache whose blocks are handed out in shuffled order, so
    every block table is non-contiguous and interleaved with the other sequences' tables."""

    def __init__(self, model, num_blocks: int = 64, block_size: int = 4, seed: int = 0,
                 native_attention: bool | None = None):
        self.model, self.block_size, self.native_attention = model, block_size, native_attention
        self.kv = allocate_kv_cache(model.config, num_blocks, block_size, torch.float32, "cpu")
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.tables: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    def fork(self, source: str, name: str, num_blocks: int) -> None:
        """Start `name` on the first full blocks of `source`, as a prefix cache hit does."""
        self.tables[name] = self.tables[source][:num_blocks]
        self.lens[name] = num_blocks * self.block_size

    def build(self, new_tokens: dict[str, list[int]]) -> AttentionMetadata:
        query_lens, context_lens = [], []
        for name, tokens in new_tokens.items():
            context = self.lens.get(name, 0) + len(tokens)
            table = self.tables.setdefault(name, [])
            while len(table) * self.block_size < context:
                table.append(self.free.pop())
            self.lens[name] = context
            query_lens.append(len(tokens))
            context_lens.append(context)
        return AttentionMetadata.build(query_lens, context_lens, [self.tables[n] for n in new_tokens],
                                       self.block_size, self.model.config.sliding_window,
                                       native_attention=self.native_attention)

    def step(self, new_tokens: dict[str, list[int]], meta: AttentionMetadata | None = None):
        """One packed forward; each sequence's logits (q, vocab) at every one of its new tokens."""
        meta = meta or self.build(new_tokens)
        ids = torch.tensor([t for tokens in new_tokens.values() for t in tokens])
        logits = self.model(ids, meta, self.kv, logits_index=torch.arange(len(ids)))
        return dict(zip(new_tokens, logits.split(meta.query_lens)))


def prefill_then_decode(model, tokens: list[int], prompt_len: int, native_attention: bool | None = None):
    run = PagedRun(model, native_attention=native_attention)
    rows = [run.step({"s": tokens[:prompt_len]})["s"]]
    rows += [run.step({"s": [token]})["s"] for token in tokens[prompt_len:]]
    return torch.cat(rows)


# The CPU attends with the native kernel by default (model/kernels/cpu/attention.cpp); the torch backend is
# the GPU's without Triton and the CPU's where the kernels do not build.
NATIVE = pytest.param(True, id="native", marks=needs_native)
BACKENDS = pytest.mark.parametrize("native_attention", [NATIVE, pytest.param(False, id="torch")])


@BACKENDS
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_decode_matches_full_forward(family, native_attention):
    model, tokens = get_model(family), random_tokens(24, seed=1)  # 24 > the window of 8
    torch.testing.assert_close(prefill_then_decode(model, tokens, 5, native_attention), full_logits(model, tokens),
                               atol=ATOL, rtol=0)


@BACKENDS
@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_matches_each_sequence_alone(family, native_attention):
    model = get_model(family)
    seqs = {name: random_tokens(n, seed=10 + i) for i, (name, n) in enumerate(
        {"a": 20, "b": 12, "c": 13, "d": 3}.items())}
    schedule = [  # name -> (start, end) of the tokens it brings to the step
        {"a": (0, 9), "b": (0, 3)},
        # decode (a), prefill chunk over cached context (b), fresh prefill (c), one-token prompt (d)
        {"a": (9, 10), "b": (3, 8), "c": (0, 10), "d": (0, 1)},
        {"c": (10, 11), "a": (10, 11), "d": (1, 3), "b": (8, 9)},
        # a chunk whose context (19) is longer than the window while others decode
        {"b": (9, 12), "a": (11, 19), "c": (11, 12)},
        {"a": (19, 20), "c": (12, 13)},
    ]
    run, got = PagedRun(model, native_attention=native_attention), {name: [] for name in seqs}
    for step in schedule:
        out = run.step({name: seqs[name][start:end] for name, (start, end) in step.items()})
        for name, logits in out.items():
            got[name].append(logits)
    for name, tokens in seqs.items():
        torch.testing.assert_close(torch.cat(got[name]), full_logits(model, tokens), atol=ATOL, rtol=0,
                                   msg=lambda m, name=name: f"sequence {name}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_uncached_batch_matches_each_sequence_alone(family):
    model = get_model(family)
    seqs = [random_tokens(n, seed=20 + n) for n in (5, 11, 1, 17)]
    lens = [len(s) for s in seqs]
    meta = AttentionMetadata.build(lens, lens, None, sliding_window=model.config.sliding_window)
    packed = model(torch.tensor(sum(seqs, [])), meta, None, logits_index=torch.arange(sum(lens)))
    for tokens, logits in zip(seqs, packed.split(lens)):
        torch.testing.assert_close(logits, full_logits(model, tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_matches_single_prefill(family):
    model, tokens = get_model(family), random_tokens(25, seed=3)
    run, rows, start = PagedRun(model, seed=7), [], 0
    for size in (7, 5, 13):
        rows.append(run.step({"s": tokens[start:start + size]})["s"])
        start += size
    single = PagedRun(model, seed=8).step({"s": tokens})["s"]
    torch.testing.assert_close(torch.cat(rows), single, atol=ATOL, rtol=0)
    torch.testing.assert_close(single, full_logits(model, tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_reusing_cached_prefix_blocks_matches_full_forward(family):
    model = get_model(family)
    run = PagedRun(model)
    prefix = random_tokens(12, seed=30)  # 3 full blocks of 4
    first, second = prefix + random_tokens(3, seed=31), prefix + random_tokens(6, seed=32)
    run.step({"first": first})
    run.fork("first", "second", num_blocks=3)
    # The second sequence computes only its own tokens, reading the prefix's K/V from shared blocks,
    # in the same step as the first sequence decodes on.
    out = run.step({"second": second[12:], "first": [7]})
    torch.testing.assert_close(out["second"], full_logits(model, second)[12:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["first"], full_logits(model, first + [7])[-1:], atol=ATOL, rtol=0)


def max_diff_per_position(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().amax(dim=-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_changing_a_future_token_leaves_earlier_logits_unchanged(family):
    model, tokens, t = get_model(family), random_tokens(20, seed=4), 11
    changed = list(tokens)
    changed[t] = (tokens[t] + 1) % 512
    diff = max_diff_per_position(full_logits(model, tokens), full_logits(model, changed))
    assert diff[:t].max() <= ATOL, "a later token leaked into earlier positions: the mask is not causal"
    assert diff[t:].min() > CLEARLY_DIFFERENT, "the change did not reach later positions"


@pytest.mark.parametrize("broken", ["bidirectional", "one_future_key"])
def test_a_wrong_prefill_mask_is_caught(broken):
    """Negative control: the equality checks above would fail if the mask let queries see ahead."""
    model, tokens = get_model("llama-gqa"), random_tokens(16, seed=5)
    meta = AttentionMetadata.build([16], [16], None)
    q_pos, k_pos = torch.arange(16)[:, None], torch.arange(16)[None, :]
    meta.prefills[0].mask = torch.ones(16, 16, dtype=torch.bool) if broken == "bidirectional" \
        else k_pos <= q_pos + 1
    wrong = model(torch.tensor(tokens), meta, None, logits_index=torch.arange(16))
    diff = max_diff_per_position(wrong, full_logits(model, tokens))
    # Every position changes, the last one too: it has nothing ahead, but in the second layer it
    # reads the earlier positions' already-contaminated states.
    assert diff.min() > CLEARLY_DIFFERENT


def test_a_decode_row_that_misses_its_own_key_is_caught():
    """Negative control for the decode path: an off-by-one key mask (k < ctx - 1) changes logits."""
    model, tokens = get_model("llama-gqa"), random_tokens(10, seed=6)
    run = PagedRun(model, native_attention=False)
    run.step({"s": tokens[:9]})
    meta = run.build({"s": tokens[9:]})
    meta.decode.key_mask[..., 8] = False  # hide key position 8, i.e. the row's own new token
    wrong = run.step({"s": tokens[9:]}, meta)["s"]
    assert max_diff_per_position(wrong, full_logits(model, tokens)[9:]).item() > CLEARLY_DIFFERENT


def test_sliding_window_changes_logits_only_beyond_the_window():
    model, tokens = get_model("mistral-window"), random_tokens(20, seed=7)
    window = model.config.sliding_window
    assert window == 8
    windowed, unwindowed = full_logits(model, tokens), full_logits(without_window(model), tokens)
    diff = max_diff_per_position(windowed, unwindowed)
    assert diff[:window].max() <= ATOL  # up to `window` keys, the window hides nothing
    assert diff[window:].min() > CLEARLY_DIFFERENT
    # The cache path applies the same window: it matches the windowed reference, not the other one.
    cached = prefill_then_decode(model, tokens, 3)
    torch.testing.assert_close(cached, windowed, atol=ATOL, rtol=0)
    assert max_diff_per_position(cached, unwindowed)[window:].min() > CLEARLY_DIFFERENT


@pytest.mark.parametrize("query_lens, context_lens, block_tables", [
    ([], [], None),
    ([2, 3], [2], None),
    ([0], [0], None),
    ([3], [2], [[0]]),  # more new tokens than the context holds
    ([2], [5], None),  # an uncached step must bring whole sequences
    ([1], [9], [[0, 1]]),  # 2 blocks of 4 cannot hold 9 tokens
    ([6, 2], [6, 8], [[5], [3, 7]]),  # short table next to a longer one: would write into block 0
    ([1, 1], [1, 1], [[0]]),  # one table for two sequences
], ids=["empty", "unequal_lists", "zero_query", "context_shorter_than_query", "uncached_with_history",
        "table_too_short", "short_table_in_batch", "missing_table"])
def test_metadata_rejects_bad_lengths(query_lens, context_lens, block_tables):
    with pytest.raises(ValueError):
        AttentionMetadata.build(query_lens, context_lens, block_tables, block_size=4)


def test_forward_beyond_max_position_raises():
    model = get_model("gpt2")  # learned positions: position max_position has no embedding at all
    limit = model.config.max_position
    meta = AttentionMetadata.build([limit], [limit], None)
    assert model(torch.zeros(limit, dtype=torch.long), meta, None).isfinite().all()  # the edge is fine
    meta = AttentionMetadata.build([limit + 1], [limit + 1], None)
    with pytest.raises(ValueError, match="max_position"):
        model(torch.zeros(limit + 1, dtype=torch.long), meta, None)
    run = PagedRun(model, num_blocks=(limit + 4) // 4 + 1)
    run.step({"s": [0] * limit})
    with pytest.raises(ValueError, match="max_position"):
        run.step({"s": [0]})  # one decode step past the end, through the cache


def test_metadata_built_for_another_window_is_refused():
    model = get_model("mistral-window")
    meta = AttentionMetadata.build([4], [4], None, sliding_window=None)
    with pytest.raises(ValueError, match="sliding_window"):
        model(torch.tensor([1, 2, 3, 4]), meta, None)
