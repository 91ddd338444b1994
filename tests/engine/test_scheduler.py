"""Scheduler over a real BlockManager and Sequences, no model: each simulated step marks the scheduled
tokens computed and appends a fake output token to every request whose step reached its last token."""
from __future__ import annotations

import itertools

from service.engine.block_manager import BlockManager
from service.engine.request import SamplingParams
from service.engine.sequence import Sequence, SequenceGroup, Status
from service.engine.scheduler import ScheduledBatch, Scheduler

BS = 4
_fake_ids = itertools.count(1000)


def make(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=32, block_size=BS) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, max_num_batched_tokens)


def req(name: str, prompt_len: int, max_tokens: int = 4, priority: int = 0, first_token: int = 0) -> Sequence:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return Sequence(list(range(first_token, first_token + prompt_len)), params, seq_id=name, priority=priority)


def simulate(sched: Scheduler, batch: ScheduledBatch) -> list[Sequence]:
    """Apply one step's results the way the engine does; returns the requests that finished."""
    finished = []
    for request, n in zip(batch.sequences, batch.num_new_tokens):
        assert n >= 1
        assert len(sched.blocks.table(request.seq_id)) * BS >= request.num_computed_tokens + n
        request.num_computed_tokens += n
        assert request.num_computed_tokens <= request.num_tokens
        if request.num_computed_tokens == request.num_tokens:
            request.output_ids.append(next(_fake_ids))
            if request.num_output_tokens >= request.params.max_tokens:
                request.status = Status.FINISHED
                sched.remove(request)
                finished.append(request)
                continue
        sched.blocks.commit(request.seq_id, request.all_ids, request.num_computed_tokens)
    return finished


def run_all(sched: Scheduler, max_steps: int = 1000, on_step=None) -> list[Sequence]:
    """Step until nothing is left; returns requests in finishing order."""
    done = []
    for step in range(max_steps):
        if not sched.has_work():
            break
        batch = sched.schedule()
        assert batch.total_tokens <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        if on_step is not None:
            on_step(step, batch)
        done += simulate(sched, batch)
    assert not sched.has_work()
    assert sched.blocks.num_used == 0
    return done


def test_token_budget_and_completion():
    sched = make(num_blocks=128, max_num_batched_tokens=24)
    requests = [req(f"r{i}", prompt_len=5 + 13 * i, max_tokens=3 + i, first_token=100 * i) for i in range(6)]
    for r in requests:
        sched.add(r)
    totals = []
    done = run_all(sched, on_step=lambda step, batch: totals.append(batch.total_tokens))
    assert sorted(r.seq_id for r in done) == sorted(r.seq_id for r in requests)
    assert all(r.num_output_tokens == r.params.max_tokens for r in requests)
    assert max(totals) == 24, "the budget should be filled when there is enough work"
    assert sum(totals) == sum(r.num_prompt_tokens + r.num_output_tokens - 1 for r in requests)


def test_running_requests_come_first():
    sched = make(max_num_batched_tokens=8)
    long = req("long", prompt_len=30)
    sched.add(long)
    simulate(sched, sched.schedule())  # long takes the whole budget for its first chunk
    sched.add(req("late", prompt_len=3, first_token=500))
    batch = sched.schedule()
    assert [r.seq_id for r in batch.sequences] == ["long"]
    assert batch.num_new_tokens == [8]
    assert sched.num_waiting == 1


def test_chunked_prefill_interleaves_with_decodes():
    sched = make(max_num_batched_tokens=16)
    decoders = [req(f"d{i}", prompt_len=3, max_tokens=50, first_token=100 * i) for i in range(3)]
    for r in decoders:
        sched.add(r)
    simulate(sched, sched.schedule())  # all three prefill at once and sample their first token
    assert all(r.num_output_tokens == 1 for r in decoders)
    long = req("long", prompt_len=100, first_token=1000)
    sched.add(long)
    steps = 0
    while long.num_output_tokens == 0:
        before = [r.num_output_tokens for r in decoders]
        batch = sched.schedule()
        assert batch.sequences[:3] == decoders and batch.num_new_tokens[:3] == [1, 1, 1]
        assert batch.sequences[3] is long and batch.num_new_tokens[3] == min(13, 100 - long.num_computed_tokens)
        simulate(sched, batch)
        assert [r.num_output_tokens for r in decoders] == [n + 1 for n in before]
        steps += 1
    assert steps == -(-100 // 13)  # chunks of 16 - 3 decode tokens


def test_max_num_seqs_cap():
    sched = make(max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(5):
        sched.add(req(f"r{i}", prompt_len=4, max_tokens=3, first_token=10 * i))
    batch = sched.schedule()
    assert len(batch.sequences) == 2 and sched.num_running == 2 and sched.num_waiting == 3
    seen = []
    run_all(sched, on_step=lambda step, batch: seen.append(len(batch.sequences)))
    assert max(seen) <= 2


def test_priority_then_arrival():
    sched = make(max_num_seqs=1)
    for name, priority in [("a1", 1), ("b0", 0), ("c1", 1), ("d0", 0), ("e-1", -1)]:
        sched.add(req(name, prompt_len=3, max_tokens=1, priority=priority, first_token=hash(name) % 1000))
    done = run_all(sched)
    assert [r.seq_id for r in done] == ["e-1", "b0", "d0", "a1", "c1"]


def test_preempts_newest_when_blocks_run_out():
    # 8 blocks of 4 tokens; two requests of 8-token prompts that each grow to 8 + 16 = 24 tokens (6 blocks).
    sched = make(num_blocks=8, max_num_batched_tokens=64)
    old, new = req("old", 8, max_tokens=16), req("new", 8, max_tokens=16, first_token=100)
    sched.add(old)
    sched.add(new)
    preempted_at = None
    for step in range(100):
        batch = sched.schedule()
        if batch.num_preempted:
            preempted_at = step
            assert new.status == Status.WAITING and new.num_computed_tokens == 0
            assert new.num_preemptions == 1 and sched.num_preemptions == 1
            assert sched.running == [old] and batch.sequences == [old]
            assert sched.waiting[0][1] is new
            assert not sched.blocks.tables.get("new")
            break
        simulate(sched, batch)
    assert preempted_at is not None
    kept_outputs = list(new.output_ids)
    assert kept_outputs, "the preempted request keeps its output tokens to recompute them"
    simulate(sched, batch)
    done = run_all(sched)
    assert [r.seq_id for r in done] == ["old", "new"]
    assert new.output_ids[:len(kept_outputs)] == kept_outputs and new.num_output_tokens == 16


def test_preempted_request_goes_before_earlier_waiting_ones():
    sched = make(num_blocks=8, max_num_seqs=2, max_num_batched_tokens=64)
    old, new = req("old", 8, max_tokens=16), req("new", 8, max_tokens=16, first_token=100)
    queued = req("queued", 4, max_tokens=1, first_token=200)
    for r in (old, new, queued):
        sched.add(r)
    while not sched.num_preemptions:
        simulate(sched, sched.schedule())
    assert [item[1].seq_id for item in sched.waiting] == ["new", "queued"]


def test_only_request_preempts_itself_and_recovers():
    # One request that needs every block: it never preempts others, it just grows.
    sched = make(num_blocks=4, max_num_batched_tokens=64)
    r = req("only", 5, max_tokens=11)
    sched.add(r)
    done = run_all(sched)
    assert done == [r] and sched.num_preemptions == 0


def test_siblings_wait_for_the_first_prompt():
    sched = make(max_num_batched_tokens=8)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=2)
    prompt = list(range(20))
    first, *siblings = SequenceGroup.create("g", prompt, params, stop_ids=[]).sequences
    other = req("other", 3, max_tokens=1, first_token=500)
    for r in [first, *siblings, other]:
        sched.add(r)
    batch = sched.schedule()
    assert batch.sequences == [first] and batch.num_new_tokens == [8]
    simulate(sched, batch)
    while not first.prompt_done:
        batch = sched.schedule()
        # The siblings are skipped (not admitted to compute the same prompt again), but "other",
        # behind them in the queue, is not blocked by them.
        assert all(s not in batch.sequences for s in siblings)
        simulate(sched, batch)
    assert other.is_finished
    hits_before = sched.blocks.prefix_hits
    batch = sched.schedule()
    admitted = [r for r in batch.sequences if r in siblings]
    assert admitted == siblings  # in their own order, ahead of "other"
    assert all(s.num_cached_tokens == 16 for s in siblings)  # 4 full blocks of the 20-token prompt
    assert sched.blocks.prefix_hits - hits_before == 32
    assert all(sched.blocks.table(s.seq_id)[:4] == sched.blocks.table(first.seq_id)[:4] for s in siblings)
    simulate(sched, batch)
    run_all(sched)
