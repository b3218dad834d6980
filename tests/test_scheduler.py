"""Scheduler and block manager on fake block counts, without torch."""

import subprocess
import sys

import pytest

from afm.engine.block_manager import NULL_BLOCK, BlockManager
from afm.engine.request import Request, RequestStatus
from afm.engine.sampling_params import SamplingParams
from afm.engine.scheduler import Scheduler, SchedulerConfig
from afm.engine.step_inputs import BlockTables


def req(rid, n_prompt, max_tokens=8, base=0):
    return Request(rid, [base + i for i in range(n_prompt)], SamplingParams(max_tokens=max_tokens))


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, caching=True):
    bm = BlockManager(num_blocks, block_size, caching)
    return Scheduler(SchedulerConfig(max_num_seqs, budget, 1024), bm), bm


def run_step(sched, new_token=7):
    """One engine step: schedule, 'compute', and append a token for requests that reached their end."""
    out = sched.schedule()
    samplers = [s.request for s in out.scheduled if s.samples]
    sched.update_after_step(out)
    for r in samplers:
        r.output_token_ids.append(new_token)
    return out


def test_scheduler_modules_do_not_import_torch():
    code = ("import sys, afm.engine.scheduler, afm.engine.block_manager, afm.engine.step_inputs; "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_block_allocation_and_free():
    bm = BlockManager(8, 4)
    r = req("a", 10)
    assert bm.allocate(r, 10)
    assert len(r.block_ids) == 3 and NULL_BLOCK not in r.block_ids
    assert bm.num_free_blocks == 7 - 3
    assert not bm.allocate(req("b", 17), 17)  # needs 5 blocks, 4 free: nothing changes
    assert bm.num_free_blocks == 4
    bm.free(r)
    assert bm.num_free_blocks == 7 and r.block_ids == []
    bm.check_invariants()


def test_prefix_cache_shares_full_blocks_and_leaves_one_token():
    bm = BlockManager(16, 4)
    a = req("a", 10)
    bm.allocate(a, 10)
    a.num_computed_tokens = 10
    bm.cache_full_blocks(a)
    assert len(bm.cached) == 2  # two full blocks of four
    b = req("b", 10)  # same tokens
    hit = bm.find_cached_prefix(b)
    assert hit == a.block_ids[:2]
    assert bm.allocate(b, 2, hit)
    assert b.num_computed_tokens == 8 and b.block_ids[:2] == a.block_ids[:2]
    assert bm.blocks[hit[0]].ref_count == 2
    # a prompt that is exactly cached still computes its last token
    c = req("c", 8)
    assert len(bm.find_cached_prefix(c)) == 1
    # a different token early on breaks the chain
    d = Request("d", [99] + list(range(1, 10)), SamplingParams())
    assert bm.find_cached_prefix(d) == []
    bm.check_invariants()


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    bm = BlockManager(5, 4)  # 4 usable blocks
    a = req("a", 8)
    bm.allocate(a, 8)
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    bm.free(a)
    assert bm.num_free_blocks == 4 and len(bm.cached) == 2
    again = req("a2", 9)
    hit = bm.find_cached_prefix(again)
    assert len(hit) == 2  # still cached after free
    other = req("x", 16, base=100)  # needs all 4 blocks: evicts the cached ones
    assert bm.allocate(other, 16)
    assert bm.cached == {}
    assert bm.find_cached_prefix(req("a3", 9)) == []
    bm.check_invariants()


def test_fifo_admission_and_budget():
    sched, bm = make(budget=10, max_num_seqs=2)
    for i, n in enumerate([6, 6, 3]):
        sched.add_request(req(f"r{i}", n))
    out = sched.schedule()
    # r0 (6 tokens) and 4 tokens of r1 (chunked), r2 must wait: max_num_seqs and the budget
    assert [(s.request.request_id, s.num_tokens) for s in out.scheduled] == [("r0", 6), ("r1", 4)]
    assert [s.samples for s in out.scheduled] == [True, False]
    sched.update_after_step(out)
    out.scheduled[0].request.output_token_ids.append(1)
    out = sched.schedule()
    assert [(s.request.request_id, s.num_tokens) for s in out.scheduled] == [("r0", 1), ("r1", 2)]


def test_chunked_prefill_mixes_with_decodes():
    sched, _ = make(budget=8)
    sched.add_request(req("short", 3))
    run_step(sched)
    sched.add_request(req("long", 20))
    sizes = []
    while sched.requests["long"].num_output_tokens == 0:
        out = run_step(sched)
        sizes.append([(s.request.request_id, s.num_tokens) for s in out.scheduled])
    assert sizes[0] == [("short", 1), ("long", 7)]
    assert sizes[1] == [("short", 1), ("long", 7)]
    assert sizes[2] == [("short", 1), ("long", 6)]


def test_preemption_takes_the_newest_and_loses_nothing():
    sched, bm = make(num_blocks=9, block_size=4, budget=64)  # 8 usable blocks
    a, b = req("a", 12, max_tokens=20), req("b", 12, max_tokens=20, base=50)
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched)  # both prefilled: 3 + 3 blocks, both full
    run_step(sched)  # each needs a 4th block: 8 used
    assert bm.num_free_blocks == 0
    for _ in range(3):
        run_step(sched)  # a and b fill their 4th blocks
    out = run_step(sched)  # a needs a 5th block: b (newest) is preempted
    assert out.preempted == [b] and b.status == RequestStatus.PREEMPTED
    assert b.num_computed_tokens == 0 and b.block_ids == [] and b.num_output_tokens == 5
    assert list(sched.waiting) == [b]
    bm.check_invariants()
    # b comes back first when a finishes, recomputing prompt and outputs (partly from the prefix cache)
    sched.finish(a, RequestStatus.FINISHED_LENGTH)
    out = run_step(sched)
    assert out.scheduled[0].request is b and b.num_cached_tokens > 0
    assert b.num_computed_tokens == b.num_tokens - 1


def test_request_that_outgrows_the_pool_preempts_itself():
    sched, bm = make(num_blocks=4, block_size=4, budget=64)  # 3 usable blocks
    a = req("a", 11, max_tokens=1)
    sched.add_request(a)
    run_step(sched)
    assert a.num_computed_tokens == 11
    out = sched.schedule()  # 12th token fits block 3 exactly
    assert out.scheduled and not out.preempted


def test_abort_frees_blocks_at_once():
    sched, bm = make()
    r = req("a", 10)
    sched.add_request(r)
    run_step(sched)
    assert bm.num_free_blocks < bm.num_usable_blocks
    sched.abort("a")
    assert r.status == RequestStatus.FINISHED_ABORTED and bm.num_free_blocks == bm.num_usable_blocks
    assert not sched.has_unfinished()


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_keeps_invariants_and_frees_everything(seed):
    import random

    rng = random.Random(seed)
    sched, bm = make(num_blocks=24, block_size=4, budget=16, max_num_seqs=6)
    pending = [req(f"r{i}", rng.randint(1, 30), max_tokens=rng.randint(1, 12), base=rng.choice([0, 0, 1000 * i]))
               for i in range(40)]
    steps = 0
    while pending or sched.has_unfinished():
        if pending and rng.random() < 0.5:
            sched.add_request(pending.pop())
        out = run_step(sched, new_token=rng.randint(0, 50))
        for s in out.scheduled:
            r = s.request
            if r.num_output_tokens >= r.sampling_params.max_tokens and not r.is_finished:
                sched.finish(r, RequestStatus.FINISHED_LENGTH)
        if rng.random() < 0.05 and sched.running:
            sched.abort(rng.choice(sched.running).request_id)
        bm.check_invariants()
        assert sum(s.num_tokens for s in out.scheduled) <= 16 and len(sched.running) <= 6
        steps += 1
        assert steps < 5000
    assert bm.num_free_blocks == bm.num_usable_blocks


def naive_inputs(scheduled, block_size):
    """A step's inputs built request by request, token by token: the reference for `BlockTables.build`."""
    ids, pos, slots, lens, qsl = [], [], [], [], [0]
    width = max(len(s.request.block_ids) for s in scheduled)
    tables = []
    for s in scheduled:
        r = s.request
        for p in range(r.num_computed_tokens, r.num_computed_tokens + s.num_tokens):
            ids.append(r.all_token_ids[p])
            pos.append(p)
            slots.append(r.block_ids[p // block_size] * block_size + p % block_size)
        lens.append(r.num_computed_tokens + s.num_tokens)
        qsl.append(qsl[-1] + s.num_tokens)
        tables.append(r.block_ids + [NULL_BLOCK] * (width - len(r.block_ids)))
    return ids, pos, slots, lens, qsl, tables


@pytest.mark.parametrize("seed", range(4))
def test_persistent_block_tables_build_the_same_inputs_as_a_naive_loop(seed):
    """Chunked prefills, decodes, prefix hits, preemptions, aborts: every step's vectorised inputs equal
    the request-by-request construction, and every row is free at the end."""
    import random

    rng = random.Random(seed)
    block_size = 4
    sched, _ = make(num_blocks=20, block_size=block_size, budget=16, max_num_seqs=6)
    tables = BlockTables(6, 64, block_size)
    pending = [req(f"r{i}", rng.randint(1, 30), max_tokens=rng.randint(1, 14), base=rng.choice([0, 0, 1000 * i]))
               for i in range(40)]
    saw_preemption = saw_decode_step = False
    while pending or sched.has_unfinished():
        if pending and rng.random() < 0.5:
            sched.add_request(pending.pop())
        out = sched.schedule()
        for r in out.preempted:
            tables.release(r)
            saw_preemption = True
        if out.scheduled:
            built = tables.build(out.scheduled)
            ids, pos, slots, lens, qsl, table = naive_inputs(out.scheduled, block_size)
            assert built.input_ids.tolist() == ids and built.positions.tolist() == pos
            assert built.slot_mapping.tolist() == slots and built.seq_lens.tolist() == lens
            assert built.query_start_loc.tolist() == qsl and built.block_tables.tolist() == table
            assert built.max_query_len == max(s.num_tokens for s in out.scheduled) and built.max_seq_len == max(lens)
            saw_decode_step |= built.max_query_len == 1
        samplers = [s.request for s in out.scheduled if s.samples]
        sched.update_after_step(out)
        for r in samplers:
            r.output_token_ids.append(rng.randint(0, 50))
            if r.num_output_tokens >= r.sampling_params.max_tokens:
                sched.finish(r, RequestStatus.FINISHED_LENGTH)
                tables.release(r)
        if rng.random() < 0.05 and sched.running:
            victim = rng.choice(sched.running)
            sched.abort(victim.request_id)
            tables.release(victim)
    assert saw_preemption and saw_decode_step
    assert sorted(tables.free_rows) == list(range(6)) and not tables.table.any()


def test_async_steps_schedule_the_token_in_flight_and_stop_before_the_last():
    """With a token in flight a request decodes it next (a placeholder input, filled on the device), is not
    scheduled past a token certain to be its last, and offers its blocks to the prefix cache only once
    the tokens filling them are known."""
    sched, bm = make(block_size=4)
    a = req("a", 7, max_tokens=3)
    sched.add_request(a)
    first = sched.schedule()  # the prefill samples token 1
    assert [s.num_tokens for s in first.scheduled] == [7] and first.scheduled[0].samples
    a.num_in_flight += 1
    sched.advance(first)
    second = sched.schedule()  # launched before token 1 is read back: it decodes that token
    assert [(s.request, s.num_tokens, s.samples) for s in second.scheduled] == [(a, 1, True)]
    inputs = BlockTables(8, 8, 4).build(second.scheduled)
    assert inputs.input_ids.tolist() == [0] and inputs.positions.tolist() == [7]
    assert inputs.in_flight_rows.tolist() == [0] and inputs.in_flight_requests == [a]
    a.num_in_flight += 1
    sched.advance(second)
    a.output_token_ids.append(11)  # step 1's token arrives
    a.num_in_flight -= 1
    sched.register_computed_blocks(first)
    assert a.num_registered_blocks == 2  # 8 computed tokens, all known: positions 0-7
    third = sched.schedule()  # token 3 (in flight after this step) is the last of max_tokens 3
    assert [(s.request, s.num_tokens) for s in third.scheduled] == [(a, 1)]
    a.num_in_flight += 1
    sched.advance(third)
    a.output_token_ids.append(12)
    a.num_in_flight -= 1
    assert sched.schedule().is_empty  # its last token is in flight: nothing left to compute
    sched.finish(a, RequestStatus.FINISHED_LENGTH)
    sched.register_computed_blocks(third)  # finished since: nothing more to offer, nothing breaks
    assert bm.num_free_blocks == bm.num_usable_blocks
