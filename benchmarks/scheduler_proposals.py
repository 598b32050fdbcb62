"""The scheduler's host time per step with speculative proposals, beside the same step without.

    python benchmarks/scheduler_proposals.py --running 16,64,256

With speculative decoding every running request may carry proposals, and the scheduler
checks for each one what the requests behind it, and the oldest waiting request, still need
this step. Here ``--running`` requests decode (a 20-token prompt each) in a pool with room
for little more, while a request whose prompt starts with a ``--prefix``-token prefix held in
the prefix cache waits (it does not fit); each step every running request proposes 3 tokens
and all are refused. Reported: the median ``Scheduler.schedule()`` of ``--steps`` steps with
the proposals, and without them (the anchor, in the same run), with and without the waiting
request. No model runs: each scheduled request samples one token, and the pool is sized so
that no request is preempted or admitted over the steps. Runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from neuron_llm.config import CacheConfig, SchedulerConfig
from neuron_llm.engine import Request, Scheduler

BLOCK_SIZE = 16
PROMPT_LEN = 20
WAITING_TAIL = 100
"""Tokens of the waiting prompt past the cached prefix, at least: more than the free blocks hold."""
MAX_TOKENS = 1000


@dataclass(frozen=True)
class Params:
    """The sampling parameters the scheduler reads."""

    max_tokens: int | None


def step(scheduler: Scheduler, proposals: bool) -> float:
    """Seconds of one ``schedule()``; every proposal is refused, one token sampled a request."""
    if proposals:
        for request in scheduler.running:
            request.draft_token_ids = [1, 2, 3]
    start = time.perf_counter()
    output = scheduler.schedule()
    seconds = time.perf_counter() - start
    scheduler.update_from_output(output, {entry.request.request_id: [5] for entry in output.scheduled})
    return seconds


def build(num_running: int, prefix_len: int, waiting: bool, num_steps: int) -> Scheduler:
    blocks_each = -(-(PROMPT_LEN + num_steps + 1) // BLOCK_SIZE)  # enough for every step
    num_blocks = 1 + prefix_len // BLOCK_SIZE + blocks_each * num_running + 2
    # The most blocks ever free (once every prompt is in): the waiting tail needs more.
    free = num_blocks - 1 - prefix_len // BLOCK_SIZE - num_running * -(-(PROMPT_LEN + 1) // BLOCK_SIZE)
    waiting_tail = max(WAITING_TAIL, BLOCK_SIZE * (free + 1))
    scheduler = Scheduler(
        CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=True),
        SchedulerConfig(
            max_model_len=prefix_len + waiting_tail + BLOCK_SIZE,
            max_num_seqs=num_running + 1,
            max_num_batched_tokens=max(8192, prefix_len + waiting_tail),
        ),
        num_blocks=num_blocks,
    )
    prefix = list(range(1, prefix_len + 1))
    scheduler.add_request(Request("warm", [*prefix, 1], Params(1)))  # publishes the prefix
    while scheduler.has_unfinished_requests():
        step(scheduler, proposals=False)
    for index in range(num_running):
        scheduler.add_request(Request(f"r{index}", [10_000 + index] * PROMPT_LEN, Params(MAX_TOKENS)))
    step(scheduler, proposals=False)  # every prompt in one step
    if waiting:
        scheduler.add_request(Request("late", [*prefix, *range(20_000, 20_000 + waiting_tail)], Params(4)))
    return scheduler


def median_ms(num_running: int, prefix_len: int, waiting: bool, proposals: bool, num_steps: int) -> float:
    scheduler = build(num_running, prefix_len, waiting, num_steps)
    times = [step(scheduler, proposals) for _ in range(num_steps)]
    assert len(scheduler.running) == num_running and len(scheduler.waiting) == int(waiting), "the case changed"
    return 1e3 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--running", default="16,64,256", help="comma-separated running request counts")
    parser.add_argument("--prefix", type=int, default=4096, help="tokens of the waiting request's cached prefix")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    rows = []
    print("| running | waiting request | schedule() with proposals | without (anchor) | ratio |")
    print("|---:|---|---:|---:|---:|")
    for num_running in (int(n) for n in args.running.split(",")):
        for waiting in (False, True):
            with_ms, without_ms = (
                median_ms(num_running, args.prefix, waiting, proposals, args.steps) for proposals in (True, False)
            )
            rows.append({"running": num_running, "waiting": waiting, "with_ms": with_ms, "without_ms": without_ms})
            label = f"{args.prefix}-token cached prefix" if waiting else "none"
            print(f"| {num_running} | {label} | {with_ms:.2f} ms | {without_ms:.2f} ms | {with_ms / without_ms:.1f}x |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
