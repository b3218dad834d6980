"""A step's model inputs, built on the host with a handful of vectorised numpy operations.

On a GPU the device waits while the host builds each step's inputs, and at hundreds of concurrent
requests a per-request Python loop over block tables costs milliseconds per step. So the block tables
of running requests persist between steps, one row per request (vLLM's "persistent batch"): a decode
step appends a block to a request once every `block_size` tokens, and only then is its row written.
Everything else (positions, cache slots, sequence lengths) is derived from those rows and two small
integer vectors.

With asynchronous scheduling a request's newest token may still be on the device (`num_in_flight`):
its input id is then a placeholder, and `in_flight_rows` says which input rows the model runner fills
from the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from afm.engine.block_manager import NULL_BLOCK
from afm.engine.request import Request
from afm.engine.scheduler import ScheduledRequest


@dataclass
class StepInputs:
    """The flattened step: T tokens of S requests, as host arrays."""

    input_ids: np.ndarray  # (T,) int64
    positions: np.ndarray  # (T,) int64
    slot_mapping: np.ndarray  # (T,) int64: cache slot (block * block_size + offset) of each token
    query_start_loc: np.ndarray  # (S + 1,) int32
    seq_lens: np.ndarray  # (S,) int32: context length including this step's tokens
    block_tables: np.ndarray  # (S, width) int32, NULL_BLOCK past each request's blocks
    max_query_len: int
    max_seq_len: int
    # Rows of `input_ids` whose token is still on the device, and the scheduled requests they belong to.
    in_flight_rows: np.ndarray | None = None  # (F,) int64
    in_flight_requests: list[Request] | None = None

    @property
    def num_requests(self) -> int:
        return len(self.seq_lens)


class BlockTables:
    """The block tables of the running requests, one persistent row each (`Request.block_table_row`)."""

    def __init__(self, max_rows: int, max_blocks_per_seq: int, block_size: int) -> None:
        self.block_size = block_size
        self.table = np.full((max_rows, max_blocks_per_seq), NULL_BLOCK, dtype=np.int32)
        self.num_blocks = [0] * max_rows  # entries of each row that mirror its request's block_ids
        self.free_rows = list(range(max_rows - 1, -1, -1))

    def row(self, request: Request) -> int:
        """The request's row, brought up to date with its `block_ids` (which only grow while it runs)."""
        row = request.block_table_row
        if row is None:
            if not self.free_rows:
                raise RuntimeError("no free block-table row; every running request needs one")
            row = self.free_rows.pop()
            request.block_table_row = row
        ids = request.block_ids
        have = self.num_blocks[row]
        if len(ids) != have:
            if len(ids) < have:  # freed and given new blocks without a release: rewrite the row
                self.table[row, :have] = NULL_BLOCK
                have = 0
            self.table[row, have : len(ids)] = ids[have:]
            self.num_blocks[row] = len(ids)
        return row

    def release(self, request: Request) -> None:
        """Free the request's row (it finished, was aborted or preempted)."""
        row = request.block_table_row
        if row is None:
            return
        self.table[row, : self.num_blocks[row]] = NULL_BLOCK
        self.num_blocks[row] = 0
        self.free_rows.append(row)
        request.block_table_row = None

    def build(self, scheduled: Sequence[ScheduledRequest]) -> StepInputs:
        """The inputs of a step that computes `num_tokens` tokens of each scheduled request, in order."""
        S = len(scheduled)
        rows = [self.row(s.request) for s in scheduled]
        starts_list = [s.request.num_computed_tokens for s in scheduled]
        counts_list = [s.num_tokens for s in scheduled]
        total = sum(counts_list)
        width = max(self.num_blocks[r] for r in rows)
        tables = self.table[rows, :width]
        starts = np.array(starts_list, dtype=np.int64)
        in_flight = [i for i, s in enumerate(scheduled) if s.request.num_in_flight]
        if total == S:  # decode: one token per request, the last one it has
            positions = starts
            # (0 stands for a token still on the device.)
            input_ids = np.array([s.request.token_id(p) if p < s.request.num_tokens else 0
                                  for s, p in zip(scheduled, starts_list, strict=True)], dtype=np.int64)
            token_rows = np.arange(S)
            qsl = np.arange(S + 1, dtype=np.int32)
            seq_lens = starts + 1
            max_query_len = 1
        else:
            counts = np.array(counts_list, dtype=np.int64)
            offsets = np.zeros(S + 1, dtype=np.int64)
            np.cumsum(counts, out=offsets[1:])
            token_rows = np.repeat(np.arange(S), counts)
            positions = np.arange(total, dtype=np.int64) + np.repeat(starts - offsets[:-1], counts)
            # A request with a token in flight decodes exactly that token: one placeholder.
            input_ids = np.fromiter(
                (t for s, p in zip(scheduled, starts_list, strict=True)
                 for t in (s.request.token_slice(p, p + s.num_tokens) if not s.request.num_in_flight else (0,))),
                dtype=np.int64, count=total,
            )
            qsl = offsets.astype(np.int32)
            seq_lens = starts + counts
            max_query_len = max(counts_list)
        bs = self.block_size
        slots = tables[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        return StepInputs(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slots,
            query_start_loc=qsl,
            seq_lens=seq_lens.astype(np.int32),
            block_tables=tables,
            max_query_len=max_query_len,
            max_seq_len=int(seq_lens.max()),
            in_flight_rows=qsl[in_flight].astype(np.int64) if in_flight else None,
            in_flight_requests=[scheduled[i].request for i in in_flight] if in_flight else None,
        )
