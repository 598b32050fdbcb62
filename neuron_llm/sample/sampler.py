"""Batched next-token sampling, on whatever device the logits live on.

One engine step gives logits ``[num_rows, vocab]`` (one row per sequence that gets a token)
and a ``SamplingBatch`` built once from each row's ``SamplingParams`` and token history.
The order of operations follows vLLM::

    raw logits --> logprobs (returned to the user: the model's raw distribution)
        |
        +-> logit_bias, allowed_token_ids, bad_words, structured outputs
        +-> repetition, frequency, presence penalties
        +-> min_tokens: EOS and stop_token_ids -> -inf
        +-> / temperature -> min-p -> top-k -> top-p      (greedy rows skip these)
        +-> draw: argmax for greedy rows, exponential race for the others

Logprobs are those of the raw logits, before penalties and truncation (vLLM v1's default
``raw_logprobs``), so they say what the model believes, not what the sampler allowed.

Sampling uses the exponential race: with ``E_i ~ Exp(1)`` independent,
``argmax_i p_i / E_i`` is distributed as ``p`` (the Gumbel-max trick in another form).
Each seeded row draws its ``E`` from its own ``torch.Generator``, so its token depends only
on its logits, its parameters and its generator's state, never on the other rows. Nothing
here reads a tensor on the host; the caller syncs when it reads ``token_ids``.

Devices that compile one graph per shape (XLA: Neuron) sample from a *static* batch
(``SamplingBatch.build_static``): padded to a fixed row count, every per-row parameter a
tensor, so that greedy and sampled rows in any mix run the same graph. A generator cannot
live on such a device, so there each row's ``E`` is counter-based noise: a hash of the
token index under a per-row key (``noise_keys``), which the host draws from the row's
generator (kept on the host), one key per step. Seeded rows stay reproducible and
independent of the batch, though their stream differs from the eager one's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from neuron_llm import ops
from neuron_llm.outputs import Logprob
from neuron_llm.sampling_params import MAX_LOGPROBS, SamplingParams
from neuron_llm.transfer import to_device


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded with ``seed`` on ``device`` (the logits' device); None when unseeded.

    The engine creates one per seeded sequence when it arrives and keeps it for the
    sequence's life, so that every step advances the same random stream. On the XLA device
    the generator stays on the host, where the static batch draws its noise keys.
    """
    if seed is None:
        return None
    if torch.device(device).type == "xla":
        device = "cpu"
    generator = torch.Generator(device=device)
    # manual_seed takes 64-bit values; any Python int seed maps onto one deterministically.
    generator.manual_seed(seed % 2**64)
    return generator


class NoTokenLeftError(ValueError):
    """A request's own ``allowed_token_ids``, ``bad_words`` and ``min_tokens`` left no token
    to generate partway (``RowState.forbids_every_token``): it fails alone."""


@dataclass
class RowState:
    """One row of the logits: a sequence about to receive its next token."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    """Tokens generated so far (the penalties read them)."""
    generator: torch.Generator | None = None
    """The sequence's own generator when ``params.seed`` is set (see ``make_generator``)."""
    bad_words_token_ids: Sequence[Sequence[int]] = ()
    """``params.bad_words`` as token ids, each word's spellings (see ``bad_word_token_ids``)."""
    grammar_mask: np.ndarray | None = None
    """bool [vocab]: the tokens ``params.structured_outputs`` allows next (``structured.Grammar``)."""

    @property
    def is_min_tokens_unmet(self) -> bool:
        """Whether the sequence is still too short to end on EOS or a stop token."""
        return len(self.output_token_ids) < self.params.min_tokens

    def banned_token_ids(self) -> list[int]:
        """The tokens ``bad_words`` forbid next: each word's last token, where the output ends
        in the tokens before it (vLLM's rule: the prompt does not count)."""
        output = self.output_token_ids
        banned = []
        for word in self.bad_words_token_ids:
            start = len(output) - (len(word) - 1)
            if start >= 0 and all(output[start + i] == token for i, token in enumerate(word[:-1])):
                banned.append(word[-1])
        return banned

    def forbids_every_token(self, vocab_size: int, eos_token_ids: Sequence[int], hold_ends: bool = True) -> bool:
        """Whether ``allowed_token_ids``, the grammar's mask, ``bad_words`` and ``min_tokens``
        together leave no token to sample (the row's logits would all be -inf); ``hold_ends``
        False: leaving ``min_tokens`` out.

        Counts rather than masks the vocabulary: the few banned and held-back tokens against
        the number the row may sample otherwise, so a step pays for them, not for the vocabulary.
        """
        banned = self.banned_token_ids()
        if not banned and self.grammar_mask is None:
            # allowed_token_ids that min_tokens alone empties are refused when the request is added.
            return False
        removed = set(banned)
        if hold_ends and self.is_min_tokens_unmet:
            removed |= {*(self.params.stop_token_ids or ()), *eos_token_ids}
        allowed, grammar = self.params.allowed_token_set, self.grammar_mask
        if grammar is None:
            num_candidates = vocab_size if allowed is None else len(allowed)
        elif allowed is None:
            num_candidates = int(grammar.sum())
        else:
            num_candidates = int(grammar[self.params.allowed_token_array].sum())
        num_removed = sum(
            token_id < vocab_size
            and (allowed is None or token_id in allowed)
            and (grammar is None or bool(grammar[token_id]))
            for token_id in removed
        )
        return num_removed == num_candidates


@dataclass
class Penalties:
    """Per-row penalty values and the token statistics they apply to."""

    repetition: torch.Tensor
    """[num_rows, 1] fp32; 1 leaves a row unchanged."""
    frequency: torch.Tensor
    """[num_rows, 1] fp32."""
    presence: torch.Tensor
    """[num_rows, 1] fp32."""
    output_counts: torch.Tensor
    """[num_rows, vocab] fp32: how often each token was generated."""
    seen: torch.Tensor
    """[num_rows, vocab] bool: token occurs in the prompt or the output."""

    def to(self, device: torch.device | str) -> Penalties:
        """The same penalties with every tensor on ``device``."""
        return Penalties(
            self.repetition.to(device),
            self.frequency.to(device),
            self.presence.to(device),
            self.output_counts.to(device),
            self.seen.to(device),
        )


@dataclass
class SamplingBatch:
    """Everything the sampler needs about one step's rows, on the logits' device.

    Optional parts are None when no row uses them, so a batch of plain requests skips
    their work entirely.
    """

    vocab_size: int
    temperature: torch.Tensor
    """[num_rows] fp32; greedy rows hold 1 so that dividing by it changes nothing. On the
    host when ``is_all_greedy`` (it is not read then), like ``is_greedy``."""
    is_greedy: torch.Tensor
    """[num_rows] bool."""
    is_all_greedy: bool
    """Skip the random draw; a static batch holds False whatever its rows, to keep one graph."""
    top_k: torch.Tensor | None
    """[num_rows] int64 in [1, vocab]; vocab for rows without top-k."""
    top_p: torch.Tensor | None
    """[num_rows] fp32; 1 for rows without top-p."""
    min_p: torch.Tensor | None
    """[num_rows] fp32; 0 for rows without min-p."""
    logit_bias: torch.Tensor | None
    """[num_rows, vocab] fp32, each row's ``logit_bias`` (0 elsewhere), -inf where
    ``allowed_token_ids``, ``bad_words`` or a structured output forbid a token."""
    penalties: Penalties | None
    min_tokens_mask: torch.Tensor | None
    """[num_rows, vocab] bool, True for the EOS and stop tokens of rows short of min_tokens."""
    generators: dict[int, torch.Generator]
    """Row index -> generator, for seeded rows that sample (greedy rows need none)."""
    num_logprobs: int | None
    """Most top logprobs any row asked for; None when no row asked for logprobs."""
    noise_keys: torch.Tensor | None = None
    """[num_rows, 2] int32 keys of each row's counter-based noise (static batches); replaces ``generators``."""
    top_k_bound: int | None = None
    """The largest top-k of the sampled rows when every one of them has a top-k (then top-k
    selects that many logits a row rather than sorting the vocabulary); else None."""

    @property
    def num_rows(self) -> int:
        """Rows of the logits this batch describes."""
        return self.temperature.shape[0]

    @classmethod
    def build(
        cls,
        rows: Sequence[RowState],
        vocab_size: int,
        device: torch.device | str,
        eos_token_ids: Sequence[int] = (),
    ) -> SamplingBatch:
        """Gather the rows' parameters into tensors on ``device``.

        ``eos_token_ids`` are the model's end tokens, masked (with each row's
        stop_token_ids) while a row is short of min_tokens, unless it ignores EOS.
        """
        params = [row.params for row in rows]
        is_greedy = [p.is_greedy for p in params]
        top_k, top_p, min_p = _truncation_tensors(params, vocab_size, device)
        logprob_counts = [p.logprobs for p in params if p.logprobs is not None]
        # An all-greedy batch reads neither temperature nor is_greedy: they stay on the host.
        per_row_device = "cpu" if all(is_greedy) else device
        return cls(
            vocab_size=vocab_size,
            temperature=to_device(
                [1.0 if greedy else p.temperature for p, greedy in zip(params, is_greedy)],
                torch.float32,
                per_row_device,
            ),
            is_greedy=to_device(is_greedy, torch.bool, per_row_device),
            is_all_greedy=all(is_greedy),
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            logit_bias=_build_logit_bias(rows, vocab_size, device),
            penalties=_build_penalties(rows, vocab_size, device),
            min_tokens_mask=_build_min_tokens_mask(rows, vocab_size, device, eos_token_ids),
            generators={
                i: row.generator
                for i, (row, greedy) in enumerate(zip(rows, is_greedy))
                if row.generator is not None and not greedy
            },
            num_logprobs=max(logprob_counts) if logprob_counts else None,
            top_k_bound=_top_k_bound(params, vocab_size),
        )

    @classmethod
    def build_static(
        cls,
        rows: Sequence[RowState],
        vocab_size: int,
        device: torch.device | str,
        num_rows: int,
        eos_token_ids: Sequence[int] = (),
    ) -> SamplingBatch:
        """As ``build``, for a device that compiles a graph per shape: always ``num_rows`` rows.

        Rows past ``len(rows)`` are greedy padding. Temperature, top-k, top-p, min-p and the
        noise keys are always tensors and ``is_all_greedy`` is False, so any mix of greedy
        and sampled rows runs one graph. Only four parts change it, each present when some
        row uses it: logit_bias, penalties and the min_tokens mask (dense ``[num_rows, vocab]``
        tensors, built on the host) and logprobs (always the ``MAX_LOGPROBS`` best).
        """
        if len(rows) > num_rows:
            raise ValueError(f"{len(rows)} sampling rows exceed the static batch's num_rows={num_rows}")
        rows = list(rows) + [PADDING_ROW] * (num_rows - len(rows))
        params = [row.params for row in rows]
        is_greedy = [p.is_greedy for p in params]
        top_k, top_p, min_p = _truncation_tensors(params, vocab_size, device, always=True)
        logit_bias = _build_logit_bias(rows, vocab_size, "cpu")
        penalties = _build_penalties(rows, vocab_size, "cpu")
        min_tokens_mask = _build_min_tokens_mask(rows, vocab_size, "cpu", eos_token_ids)
        return cls(
            vocab_size=vocab_size,
            temperature=to_device(
                [1.0 if greedy else p.temperature for p, greedy in zip(params, is_greedy)], torch.float32, device
            ),
            is_greedy=to_device(is_greedy, torch.bool, device),
            is_all_greedy=False,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            logit_bias=None if logit_bias is None else logit_bias.to(device),
            penalties=None if penalties is None else penalties.to(device),
            min_tokens_mask=None if min_tokens_mask is None else min_tokens_mask.to(device),
            generators={},
            num_logprobs=min(MAX_LOGPROBS, vocab_size) if any(p.logprobs is not None for p in params) else None,
            noise_keys=_noise_keys(rows).to(device),
        )


PADDING_ROW = RowState(SamplingParams(temperature=0.0), (), ())
"""Fills a static batch up to its row count: greedy, so it takes no noise and no truncation
(and stands for a row in the dummy steps that compile a graph)."""


def _truncation_tensors(
    params: list[SamplingParams], vocab_size: int, device: torch.device | str, always: bool = False
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    # Greedy rows take the argmax, which every truncation keeps; give them neutral values.
    # Unless ``always``, a truncation no sampled row uses is None and skipped.
    sampled = [p for p in params if not p.is_greedy]
    top_k = top_p = min_p = None
    if always or any(p.top_k > 0 for p in sampled):
        values = [vocab_size if p.is_greedy or p.top_k == 0 else min(p.top_k, vocab_size) for p in params]
        top_k = to_device(values, torch.int64, device)
    if always or any(p.top_p < 1 for p in sampled):
        top_p = to_device([1.0 if p.is_greedy else p.top_p for p in params], torch.float32, device)
    if always or any(p.min_p > 0 for p in sampled):
        min_p = to_device([0.0 if p.is_greedy else p.min_p for p in params], torch.float32, device)
    return top_k, top_p, min_p


def _top_k_bound(params: list[SamplingParams], vocab_size: int) -> int | None:
    # Greedy rows keep every token (top-k vocab, top-p 1), which the bound allows.
    top_ks = [min(p.top_k, vocab_size) for p in params if not p.is_greedy]
    return max(top_ks) if top_ks and min(top_ks) > 0 else None


def _noise_keys(rows: Sequence[RowState]) -> torch.Tensor:
    """[num_rows, 2] int32: this step's key of each row's counter-based noise, drawn on the host.

    A seeded row draws from its own generator (one draw per step, as the eager sampler
    advances it once per step), the others from torch's default generator.
    """
    keys = torch.randint(-(2**31), 2**31, (len(rows), 2), dtype=torch.int32)
    for i, row in enumerate(rows):
        if row.generator is not None and not row.params.is_greedy:
            keys[i] = torch.randint(-(2**31), 2**31, (2,), dtype=torch.int32, generator=row.generator)
    return keys


def _padded_ids(id_lists: list[Sequence[int]], pad_id: int, device: torch.device | str) -> torch.Tensor:
    # ids: [num_rows, longest list], padded with pad_id (one past the vocabulary).
    width = max((len(ids) for ids in id_lists), default=0)
    padded = [list(ids) + [pad_id] * (width - len(ids)) for ids in id_lists]
    return to_device(padded, torch.int64, device).reshape(len(id_lists), width)


def _token_counts(id_lists: list[Sequence[int]], vocab_size: int, device: torch.device | str) -> torch.Tensor:
    # Count into one extra column that swallows the padding, then drop it.
    ids = _padded_ids(id_lists, vocab_size, device)
    counts = torch.zeros(len(id_lists), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def _build_penalties(rows: Sequence[RowState], vocab_size: int, device: torch.device | str) -> Penalties | None:
    params = [row.params for row in rows]
    if not any(p.has_penalties for p in params):
        return None

    def column(values: list[float]) -> torch.Tensor:
        return to_device(values, torch.float32, device).reshape(-1, 1)

    output_counts = _token_counts([row.output_token_ids for row in rows], vocab_size, device)
    prompt_counts = _token_counts([row.prompt_token_ids for row in rows], vocab_size, device)
    return Penalties(
        repetition=column([p.repetition_penalty for p in params]),
        frequency=column([p.frequency_penalty for p in params]),
        presence=column([p.presence_penalty for p in params]),
        output_counts=output_counts,
        seen=(output_counts > 0) | (prompt_counts > 0),
    )


def _build_logit_bias(rows: Sequence[RowState], vocab_size: int, device: torch.device | str) -> torch.Tensor | None:
    """Each row's additive bias: its ``logit_bias``, and -inf at the tokens it may not sample
    (outside ``allowed_token_ids`` or its grammar's mask, or banned by ``bad_words``); None when
    no row has any."""
    row_ids: list[int] = []
    token_ids: list[int] = []
    values: list[float] = []
    banned_rows: list[int] = []
    banned_ids: list[int] = []
    for i, row in enumerate(rows):
        bias = row.params.logit_bias or {}
        row_ids += [i] * len(bias)
        token_ids += bias.keys()
        values += bias.values()
        banned = row.banned_token_ids()
        banned_rows += [i] * len(banned)
        banned_ids += banned
    allowed = [(i, row.params.allowed_token_array) for i, row in enumerate(rows) if row.params.allowed_token_ids]
    grammars = [(i, row.grammar_mask) for i, row in enumerate(rows) if row.grammar_mask is not None]
    if not (row_ids or banned_rows or allowed or grammars):
        return None
    # Only ids, biases and grammar masks cross to ``device``; the dense bias is filled there.
    dense = torch.zeros(len(rows), vocab_size, dtype=torch.float32, device=device)
    for i, token_ids_allowed in allowed:
        dense[i] = float("-inf")
        dense[i, to_device(token_ids_allowed, torch.int64, device)] = 0.0
    if grammars:  # one copy of all the rows' masks
        grammar_rows = to_device([i for i, _ in grammars], torch.int64, device)
        masks = to_device(np.stack([mask for _, mask in grammars]), torch.bool, device)
        dense[grammar_rows] = dense[grammar_rows].masked_fill(~masks, float("-inf"))
    if row_ids:  # added, so that a token not allowed stays at -inf
        indices = (to_device(row_ids, torch.int64, device), to_device(token_ids, torch.int64, device))
        dense.index_put_(indices, to_device(values, torch.float32, device), accumulate=True)
    if banned_rows:  # last: a banned token stays banned whatever its bias
        indices = (to_device(banned_rows, torch.int64, device), to_device(banned_ids, torch.int64, device))
        dense.index_put_(indices, torch.tensor(float("-inf"), device=device))
    return dense


def _build_min_tokens_mask(
    rows: Sequence[RowState], vocab_size: int, device: torch.device | str, eos_token_ids: Sequence[int]
) -> torch.Tensor | None:
    row_ids: list[int] = []
    token_ids: list[int] = []
    for i, row in enumerate(rows):
        if not row.is_min_tokens_unmet:
            continue
        # EOS too under ignore_eos, as vLLM holds back every stop and EOS id: ignore_eos decides
        # only whether EOS ends the sequence once sampled.
        ends = set(row.params.stop_token_ids or ()) | set(eos_token_ids)
        ends = sorted(t for t in ends if t < vocab_size)
        row_ids += [i] * len(ends)
        token_ids += ends
    if not row_ids:
        return None
    # Only the (row, token) pairs cross to the device; the dense mask is filled there.
    mask = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)
    indices = (to_device(row_ids, torch.int64, device), to_device(token_ids, torch.int64, device))
    return mask.index_put_(indices, torch.ones((), dtype=torch.bool, device=device))


@dataclass
class LogprobsTensors:
    """Logprobs of one token per row and of each row's most likely tokens, on the device."""

    token_ids: torch.Tensor
    """[num_rows] int64: the token each row is scored for (sampled, or the next prompt token)."""
    token_logprobs: torch.Tensor
    """[num_rows] fp32."""
    token_ranks: torch.Tensor
    """[num_rows] int64: 1 + how many tokens are strictly more likely."""
    top_token_ids: torch.Tensor
    """[num_rows, k] int64, most likely first; k is the most any row asked for."""
    top_logprobs: torch.Tensor
    """[num_rows, k] fp32."""

    def to_host(self) -> LogprobsTensors:
        """The same tensors, copied to the host without waiting (from CUDA, into pinned memory:
        record an event after this call and wait on it before reading them)."""
        return LogprobsTensors(*(getattr(self, f.name).to("cpu", non_blocking=True) for f in fields(self)))

    def to_dicts(
        self, num_logprobs: Sequence[int | None], token_text: Callable[[int], str] | None = None
    ) -> list[dict[int, Logprob] | None]:
        """Per row, vLLM's ``{token_id: Logprob}`` with the scored token and its top ``num_logprobs[row]``.

        Rows whose count is None get None. Each ``Logprob.decoded_token`` is ``token_text(id)``
        (None without it). This reads the tensors on the host (one sync).
        """
        token_ids = self.token_ids.tolist()
        token_logprobs = self.token_logprobs.tolist()
        token_ranks = self.token_ranks.tolist()
        top_ids = self.top_token_ids.tolist()
        top_logprobs = self.top_logprobs.tolist()

        def text(token_id: int) -> str | None:
            return token_text(token_id) if token_text is not None else None

        dicts: list[dict[int, Logprob] | None] = []
        for row, count in enumerate(num_logprobs):
            if count is None:
                dicts.append(None)
                continue
            scored = token_ids[row]
            entry = {scored: Logprob(token_logprobs[row], token_ranks[row], text(scored))}
            # As in vLLM, a scored token among the top ones takes its place there as its rank.
            for rank, (token_id, logprob) in enumerate(zip(top_ids[row][:count], top_logprobs[row][:count]), 1):
                entry[token_id] = Logprob(logprob, rank, text(token_id))
            dicts.append(entry)
        return dicts


@dataclass
class SamplerOutput:
    """The sampled token of each row, and their logprobs when any row asked for them."""

    token_ids: torch.Tensor
    """[num_rows] int64, on the logits' device."""
    logprobs: LogprobsTensors | None
    num_accepted: torch.Tensor | None = None
    """After verifying proposals (``neuron_llm.sample.rejection``): [num_sequences] int64, how
    many of each sequence's proposed tokens were kept. Rows are then each sequence's
    proposals plus one, in turn, and a sequence's new tokens are its first
    ``num_accepted + 1`` rows. None after plain sampling: one row, one token per sequence."""


def score_tokens(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> LogprobsTensors:
    """Logprob and rank of ``token_ids`` [rows] and the ``num_top`` best tokens, from ``logprobs`` [rows, vocab].

    A vocabulary smaller than ``num_top`` gives all of its tokens. A token's rank counts the
    tokens at least as likely, itself included: tied tokens all take the last of their ranks,
    as in vLLM.
    """
    num_top = min(num_top, logprobs.shape[-1])
    # Indexed, not gathered and squeezed: a view would keep its base alive, and on the XLA
    # device every live tensor becomes an output of the step's graph.
    token_logprobs = logprobs[torch.arange(len(token_ids), device=logprobs.device), token_ids]
    token_ranks = (logprobs >= token_logprobs.unsqueeze(1)).sum(dim=1)
    top_logprobs, top_token_ids = logprobs.topk(num_top, dim=1)
    return LogprobsTensors(token_ids, token_logprobs, token_ranks, top_token_ids, top_logprobs)


def compute_prompt_logprobs(logits: torch.Tensor, next_token_ids: torch.Tensor, num_top: int) -> LogprobsTensors:
    """Prompt logprobs: the logprob of each actual next prompt token and the ``num_top`` best.

    ``logits`` [num_positions, vocab] are the model's outputs at prompt positions ``i`` and
    ``next_token_ids`` [num_positions] the prompt tokens at ``i + 1``. The distribution is the
    raw one, as for sampled tokens. With chunked prefill, call it per chunk: the chunk's last
    position scores the first token of the next chunk.
    """
    return score_tokens(logits.float().log_softmax(dim=-1), next_token_ids, num_top)


def _apply_penalties(logits: torch.Tensor, penalties: Penalties) -> torch.Tensor:
    # Repetition (Keskar et al., 2019, as in HF and vLLM): shrink a seen token's logit towards
    # -inf whatever its sign; frequency and presence (OpenAI) look at the output only.
    repeated = torch.where(logits > 0, logits / penalties.repetition, logits * penalties.repetition)
    logits = torch.where(penalties.seen, repeated, logits)
    logits = logits - penalties.frequency * penalties.output_counts
    return logits - penalties.presence * (penalties.output_counts > 0).float()


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The logits each row samples from: logit_bias, penalties, min_tokens, temperature, min-p,
    top-k, top-p (vLLM v1's order: top-p's mass is over what min-p kept).

    ``logits`` [num_rows, vocab] are not modified; removed tokens are -inf in the result.
    """
    assert logits.shape == (batch.num_rows, batch.vocab_size), (tuple(logits.shape), batch.vocab_size)
    logits = logits.float()
    if batch.logit_bias is not None:
        logits = logits + batch.logit_bias
    if batch.penalties is not None:
        logits = _apply_penalties(logits, batch.penalties)
    if batch.min_tokens_mask is not None:
        logits = logits.masked_fill(batch.min_tokens_mask, float("-inf"))
    if not batch.is_all_greedy:  # greedy rows hold temperature 1
        logits = logits / batch.temperature.unsqueeze(1)
    if batch.min_p is not None:
        logits = _apply_min_p(logits, batch.min_p)
    if batch.top_k is not None or batch.top_p is not None:
        logits = ops.top_k_top_p(logits, batch.top_k, batch.top_p, batch.top_k_bound)
    return logits


def _exponential_noise(like: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    noise = torch.empty_like(like)
    if len(generators) < noise.shape[0]:
        noise.exponential_()
    for row, generator in generators.items():
        noise[row].exponential_(generator=generator)
    # exponential_ may return 0, and 0 / 0 would be NaN, which argmax would pick.
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int32 (zeros move in at the top); ``>>`` on XLA rounds negatives towards 0."""
    top = torch.where(x < 0, 1 << (31 - bits), 0).to(torch.int32)
    return ((x & 0x7FFFFFFF) >> bits) | top


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # lowbias32 (https://nullprogram.com/blog/2018/07/31/): an invertible 32-bit hash whose
    # every output bit depends on every input bit. int32 products wrap on every backend.
    x = x ^ _shift_right(x, 16)
    x = x * 0x7FEB352D
    x = x ^ _shift_right(x, 15)
    x = x * -0x7B935975  # 0x846CA68B as int32
    return x ^ _shift_right(x, 16)


def _counter_uniform(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) fp32 [num_rows, len(counters)]: each int32 counter hashed under each row's key.

    The counter is hashed under the row's two key words and the low 23 bits of the result
    map to ``u`` (``bits_to_uniform``). Only 32-bit integer and fp32 operations: the same bits
    on the CPU, on torch-xla and on devices without int64.
    """
    return bits_to_uniform(_mix32(_mix32(counters.unsqueeze(0) ^ keys[:, :1]) + keys[:, 1:]))


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """``(k + 1/2) / 2**23`` for ``k`` the low 23 bits of int32 ``bits``: fp32 in (0, 1), never 0 or 1.

    Every value is exact in fp32 (with 24 bits, ``2**24 - 1/2`` rounds to ``2**24``: ``u = 1``
    would give noise 0, and a token masked out would win its row's race as 0 / 0).
    """
    return ((bits & 0x7FFFFF).float() + 0.5) * 2.0**-23


def counter_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) noise [num_rows, vocab_size] fp32, a pure function of ``keys`` [num_rows, 2] int32.

    Token ``v`` of row ``r`` takes ``-log(u)`` of the uniform ``u`` that counter ``v`` gives
    under the row's key (``_counter_uniform``).
    """
    token_ids = torch.arange(vocab_size, dtype=torch.int32, device=keys.device)
    return -_counter_uniform(keys, token_ids).log()


def counter_uniform(keys: torch.Tensor, counter: int) -> torch.Tensor:
    """One uniform (0, 1) fp32 per row of ``keys`` [num_rows, 2] int32, at ``counter``.

    A counter no token id takes (the vocabulary's size or more) gives a draw independent of
    the row's ``counter_noise``.
    """
    counters = torch.full((1,), counter, dtype=torch.int32, device=keys.device)
    return _counter_uniform(keys, counters).squeeze(1)


def draw(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """One token per row of processed ``logits``: argmax for greedy rows, the exponential race for the others."""
    if batch.is_all_greedy:
        return ops.argmax(logits)
    if batch.noise_keys is not None:
        noise = counter_noise(batch.noise_keys, batch.vocab_size)
    else:
        noise = _exponential_noise(logits, batch.generators)
    return ops.sample_argmax(logits, noise, batch.is_greedy)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Draw the next token of every row of ``logits`` [num_rows, vocab] (fp32).

    Returns the token ids [num_rows] on the logits' device and, when any row asked for
    logprobs, the raw logprobs of the sampled tokens with the ``batch.num_logprobs`` best.
    """
    token_ids = draw(process_logits(logits, batch), batch)
    if batch.num_logprobs is None:
        return SamplerOutput(token_ids, None)
    raw_logprobs = logits.float().log_softmax(dim=-1)
    return SamplerOutput(token_ids, score_tokens(raw_logprobs, token_ids, batch.num_logprobs))
