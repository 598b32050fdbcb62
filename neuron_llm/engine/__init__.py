"""The engine core: requests, the scheduler and the KV block manager; plain Python, no device library."""

from __future__ import annotations

from neuron_llm.engine.block_manager import NULL_BLOCK_ID, BlockManager, PrefixHit, hash_block
from neuron_llm.engine.request import Request, RequestStatus, SamplingParamsLike
from neuron_llm.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput, SchedulerStats

__all__ = [
    "NULL_BLOCK_ID",
    "BlockManager",
    "PrefixHit",
    "Request",
    "RequestStatus",
    "SamplingParamsLike",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerOutput",
    "SchedulerStats",
    "hash_block",
]
