"""Sampler: greedy, seeded and statistical sampling, truncation, penalties, min_tokens, logprobs."""
import pytest
import torch

from service.engine.request import SamplingParams
from service.engine.sampler import Sampler, SamplingRow

V = 32
NUM_DRAWS = 4000
# Chi-square critical value for 4 degrees of freedom at p = 0.001 (five-token distributions).
CHI2_DF4_P001 = 18.47


def make_row(prompt=(), output=(), stop_ids=(), device="cpu", **params) -> SamplingRow:
    p = SamplingParams(**params)
    generator = None if p.seed is None else torch.Generator(device=device).manual_seed(p.seed)
    return SamplingRow(p, list(prompt), list(output), generator, list(stop_ids))


def logits_from_probs(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()[None, :]


def draw(logits_row: torch.Tensor, num: int = NUM_DRAWS, seed: int = 0, **params) -> torch.Tensor:
    """Sample `num` times from one row's distribution (one batched call); returns per-token counts."""
    vocab = logits_row.shape[-1]
    rows = [make_row(**params) for _ in range(num)]
    tokens = Sampler(vocab, seed=seed)(logits_row.expand(num, vocab), rows).token_ids
    return torch.bincount(torch.tensor(tokens), minlength=vocab).float()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def support(counts: torch.Tensor) -> set[int]:
    return set(torch.nonzero(counts).flatten().tolist())


def run_steps(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow], steps: int) -> list[list[int]]:
    """Sample `steps` times, appending each row's token to its output (as the engine does)."""
    for _ in range(steps):
        for row, token in zip(rows, sampler(logits, rows).token_ids):
            row.output_ids.append(token)
    return [row.output_ids for row in rows]


def test_greedy_is_argmax_and_skips_logprobs():
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(0))
    result = Sampler(V)(logits, [make_row(temperature=0) for _ in range(8)])
    assert result.token_ids == logits.argmax(-1).tolist()
    assert result.logprobs is None and result.top_logprobs is None


def test_top_k_one_equals_greedy_at_temperature_one():
    logits = torch.randn(16, V, generator=torch.Generator().manual_seed(1))
    result = Sampler(V)(logits, [make_row(temperature=1.0, top_k=1) for _ in range(16)])
    assert result.token_ids == logits.argmax(-1).tolist()


def test_same_seed_repeats_and_different_seeds_differ():
    logits = torch.zeros(1, V)  # uniform: every draw is pure randomness

    def tokens(seed):
        return run_steps(Sampler(V, seed=99), logits, [make_row(seed=seed)], steps=50)[0]

    assert tokens(7) == tokens(7)
    assert tokens(7) != tokens(8)


def test_seeded_row_ignores_the_rest_of_the_batch():
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(2))
    alone = run_steps(Sampler(V, seed=0), logits, [make_row(seed=42, temperature=0.9)], steps=30)[0]
    for position in range(3):
        rows = [make_row(temperature=1.5), make_row(seed=5, top_p=0.9), make_row(temperature=0)]
        rows.insert(position, make_row(seed=42, temperature=0.9))
        batched = run_steps(Sampler(V, seed=position + 1), logits.expand(4, V), rows, steps=30)
        assert batched[position] == alone


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_sampled_distribution_matches_softmax(temperature):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    counts = draw(logits, temperature=temperature)
    assert chi_square(counts, torch.softmax(logits[0] / temperature, -1)) < CHI2_DF4_P001


def test_low_temperature_concentrates_and_high_temperature_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    assert draw(logits, temperature=0.05)[0] == NUM_DRAWS
    flat = draw(logits, temperature=100.0) / NUM_DRAWS
    assert (flat - 0.2).abs().max() < 0.04


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5, 0.0, 1.8, -0.5, 0.3]])
    counts = draw(logits, top_k=3)
    assert support(counts) == {1, 3, 5}
    assert chi_square(counts[[1, 3, 5]], torch.softmax(logits[0, [1, 3, 5]], -1)) < 13.8  # df 2, p 0.001


@pytest.mark.parametrize("top_p, nucleus", [(0.8, {0, 1}), (0.81, {0, 1, 2}), (0.4, {0}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_exactly_the_nucleus(top_p, nucleus):
    assert support(draw(logits_from_probs([0.5, 0.3, 0.15, 0.05]), top_p=top_p)) == nucleus


def test_top_p_renormalises_the_nucleus():
    counts = draw(logits_from_probs([0.5, 0.3, 0.15, 0.05]), top_p=0.8)
    assert abs(counts[0] / NUM_DRAWS - 0.625) < 0.03


@pytest.mark.parametrize("min_p, kept", [(0.2, {0, 1, 2}), (0.5, {0, 1}), (0.0, {0, 1, 2, 3})])
def test_min_p_drops_tokens_below_min_p_times_max(min_p, kept):
    assert support(draw(logits_from_probs([0.5, 0.3, 0.15, 0.05]), min_p=min_p)) == kept


def greedy_token(logits, **row_kwargs) -> int:
    row = make_row(temperature=0, **row_kwargs)
    return Sampler(len(logits))(torch.tensor([logits]), [row]).token_ids[0]


def test_repetition_penalty_divides_positive_logits_of_seen_tokens():
    # 2.0 / 2 = 1.0: the runner-up at 0.99 stays behind, at 1.01 takes over.
    assert greedy_token([2.0, 0.99], prompt=[0], repetition_penalty=2.0) == 0
    assert greedy_token([2.0, 1.01], prompt=[0], repetition_penalty=2.0) == 1
    assert greedy_token([2.0, 1.01], output=[0], repetition_penalty=2.0) == 1


def test_repetition_penalty_multiplies_negative_logits_of_seen_tokens():
    # -1.0 * 2 = -2.0
    assert greedy_token([-1.0, -2.01], output=[0], repetition_penalty=2.0) == 0
    assert greedy_token([-1.0, -1.99], output=[0], repetition_penalty=2.0) == 1


def test_repetition_penalty_counts_a_token_once():
    # 2.0 / 1.5 = 1.33 > 1.1 however often token 0 was seen.
    assert greedy_token([2.0, 1.1], prompt=[0, 0], output=[0, 0, 0], repetition_penalty=1.5) == 0


def test_repetition_penalty_lowers_the_probability_of_seen_tokens():
    logits = torch.tensor([[1.0, 1.0, -1.0, -1.0, 0.0]])
    plain = draw(logits)
    penalised = draw(logits, prompt=[0], output=[2], repetition_penalty=1.5)
    assert penalised[0] < plain[0] * 0.85 and penalised[2] < plain[2] * 0.85
    assert penalised[1] > plain[1]


def test_presence_and_frequency_penalties_subtract_the_documented_amounts():
    # Token 0 was generated twice: 3.0 - 0.5 * 1 - 0.6 * 2 = 1.3.
    kwargs = dict(output=[0, 2, 0], presence_penalty=0.5, frequency_penalty=0.6)
    assert greedy_token([3.0, 1.29, -5.0], **kwargs) == 0
    assert greedy_token([3.0, 1.31, -5.0], **kwargs) == 1
    assert greedy_token([3.0, 2.49], output=[0], presence_penalty=0.5) == 0
    assert greedy_token([3.0, 2.51], output=[0], presence_penalty=0.5) == 1
    assert greedy_token([3.0, 1.79], output=[0, 0], frequency_penalty=0.6) == 0
    assert greedy_token([3.0, 1.81], output=[0, 0], frequency_penalty=0.6) == 1


def test_presence_and_frequency_penalties_ignore_the_prompt():
    assert greedy_token([3.0, 2.9], prompt=[0, 0, 0], presence_penalty=2.0, frequency_penalty=2.0) == 0


def test_logit_bias_forces_and_bans_tokens():
    logits = torch.tensor([[5.0, 0.0, -3.0, 1.0]])
    assert draw(logits, num=500, logit_bias={2: 100.0})[2] == 500
    assert draw(logits, num=500, logit_bias={0: -100.0})[0] == 0
    assert greedy_token([5.0, 0.0, -3.0], logit_bias={0: -100.0}) == 1
    assert greedy_token([5.0, 0.0, -3.0], logit_bias={V + 5: 100.0}) == 0  # out of vocabulary: ignored


def test_min_tokens_bans_stop_ids_until_reached():
    logits = [10.0, 0.0, 1.0, 0.5]
    assert greedy_token(logits, output=[1, 1], stop_ids=[0], min_tokens=3) == 2
    assert greedy_token(logits, output=[1, 1, 1], stop_ids=[0], min_tokens=3) == 0
    early = draw(torch.tensor([logits]), num=500, output=[1], stop_ids=[0, 2], min_tokens=2)
    assert early[0] == 0 and early[2] == 0
    assert greedy_token(logits, output=[], stop_ids=[], min_tokens=3) == 0  # no stop ids: nothing banned


def test_logprobs_are_raw_log_softmax():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(3))
    rows = [make_row(logprobs=5, temperature=0.7, repetition_penalty=1.3, prompt=[1, 2], seed=1),
            make_row(temperature=0),
            make_row(logprobs=0, logit_bias={4: 50.0})]
    result = Sampler(V)(logits, rows)
    expected = torch.log_softmax(logits, -1)
    for i, token in enumerate(result.token_ids):
        assert result.logprobs[i] == pytest.approx(expected[i, token].item(), abs=1e-5)
    assert result.token_ids[2] == 4 and result.logprobs[2] < -1  # biased choice, raw logprob
    top = result.top_logprobs[0]
    assert [token for token, _ in top] == expected[0].topk(5).indices.tolist()
    assert [value for _, value in top] == pytest.approx(expected[0].topk(5).values.tolist(), abs=1e-5)
    assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))
    assert result.top_logprobs[1] == [] and result.top_logprobs[2] == []


def test_mixed_batch_gives_each_row_its_result_alone():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(4))

    def fresh_rows():
        return [make_row(temperature=0),
                make_row(seed=11, temperature=0.8),
                make_row(seed=12, top_p=0.7, top_k=10),
                make_row(seed=13, prompt=[3, 4], repetition_penalty=1.4, presence_penalty=0.7,
                         frequency_penalty=0.3, min_p=0.05, min_tokens=5, stop_ids=[0])]

    batched = run_steps(Sampler(V, seed=1), logits, fresh_rows(), steps=20)
    for i, row in enumerate(fresh_rows()):
        assert run_steps(Sampler(V, seed=2), logits[i:i + 1], [row], steps=20)[0] == batched[i]


def test_padded_vocabulary_columns_are_never_sampled():
    logits = torch.cat([torch.zeros(64, V), torch.full((64, 3), 50.0)], dim=1)
    rows = [make_row(temperature=t) for t in (0.0, 1.0) for _ in range(32)]
    assert max(Sampler(V)(logits, rows).token_ids) < V


def test_caller_logits_are_not_modified():
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(5))
    before = logits.clone()
    rows = [make_row(logit_bias={1: 3.0}, repetition_penalty=2.0, prompt=[2], temperature=0.5),
            make_row(presence_penalty=1.0, output=[3], min_tokens=2, stop_ids=[4], top_p=0.5)]
    Sampler(V)(logits, rows)
    assert torch.equal(logits, before)


def test_generator_on_another_device_is_refused():
    logits = torch.zeros(1, V, device="meta")  # any device other than the CPU generator's
    with pytest.raises(ValueError, match="generator"):
        Sampler(V)(logits, [make_row(seed=1)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_seeded_rows_ignore_the_batch():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(6)).cuda()
    alone = run_steps(Sampler(V), logits[:1], [make_row(seed=3, top_p=0.9, device="cuda")], steps=20)[0]
    rows = [make_row(seed=3, top_p=0.9, device="cuda"), make_row(temperature=0.5), make_row(temperature=0)]
    assert run_steps(Sampler(V, seed=9), logits, rows, steps=20)[0] == alone
    assert all(0 <= t < V for t in alone)
