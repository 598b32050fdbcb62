"""Draft-model speculative decoding: a smaller model proposes, the model verifies, and no
greedy output changes."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from neuron_llm.config import SpeculativeConfig
from neuron_llm.engine.speculative import DraftModelProposer
from neuron_llm.sampling_params import SamplingParams
from tests.conftest import build_hf_llama
from tests.engine.conftest import VOCAB_SIZE, all_blocks_free, make_llm, random_prompts
from tests.tokenizer_kinds import byte_level_bpe, sentencepiece_bpe


def _save_draft(path: Path, vocab_size: int = VOCAB_SIZE, max_position_embeddings: int = 512) -> Path:
    """A draft smaller than ``tiny_model_dir``'s model, with other random weights."""
    draft = build_hf_llama(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_position_embeddings,
    )
    draft.save_pretrained(path)
    return path


def _speculate(tiny_model_dir: Path, draft: Path, prompts: list[list[int]], params: SamplingParams, **spec):
    llm = make_llm(tiny_model_dir, speculative_config={"model": str(draft), "num_speculative_tokens": 3, **spec})
    assert isinstance(llm.engine.proposer, DraftModelProposer)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return llm, [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("draft_kind", ["the model itself", "another model"])
def test_a_draft_model_changes_no_greedy_output(tiny_model_dir, tmp_path, draft_kind) -> None:
    prompts = random_prompts(5, seed=60)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    plain = make_llm(tiny_model_dir).generate([{"prompt_token_ids": p} for p in prompts], params)
    draft = tiny_model_dir if draft_kind == "the model itself" else _save_draft(tmp_path / "draft")
    llm, ours = _speculate(tiny_model_dir, draft, prompts, params)
    assert ours == [o.outputs[0].token_ids for o in plain]
    assert all_blocks_free(llm)
    stats = llm.engine.stats()
    assert stats.num_draft_tokens > 0
    rate = stats.num_accepted_tokens / stats.num_draft_tokens
    # The model drafting for itself (fp32) proposes its own greedy tokens; a random other
    # model, next to none of them.
    assert rate > 0.9 if draft_kind == "the model itself" else rate < 0.5, rate
    # Each proposal after a sequence's first finds that sequence's earlier blocks cached.
    assert llm.engine.proposer.engine.scheduler.block_manager.prefix_hit_rate > 0.5


def test_a_draft_ignores_its_generation_config_and_the_model_may_too(tiny_model_dir, tmp_path) -> None:
    # Every draft request sets its sampling fields; on the XLA device a default penalty would
    # only compile graphs no draft step uses.
    draft = _save_draft(tmp_path / "draft")
    (draft / "generation_config.json").write_text('{"repetition_penalty": 1.3}')
    assert make_llm(draft).get_default_sampling_params().repetition_penalty == 1.3
    assert make_llm(draft, generation_config="vllm").get_default_sampling_params().repetition_penalty == 1.0
    llm = make_llm(tiny_model_dir, speculative_config={"model": str(draft), "num_speculative_tokens": 2})
    assert llm.engine.proposer.llm.generation_defaults == {}
    with pytest.raises(ValueError, match="generation_config='hf': must be 'auto' or 'vllm'"):
        make_llm(draft, generation_config="hf")


def test_a_steps_sequences_are_drafted_in_one_batch(tiny_model_dir, monkeypatch) -> None:
    prompts = random_prompts(4, seed=63)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    llm = make_llm(tiny_model_dir, speculative_config={"model": str(tiny_model_dir), "num_speculative_tokens": 3})
    draft = llm.engine.proposer.engine
    running, step = [], draft.step

    def counted():
        running.append(len(draft.scheduler.running) + len(draft.scheduler.waiting))
        return step()

    monkeypatch.setattr(draft, "step", counted)
    llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert max(running) == 4


def test_sampled_requests_are_speculated_by_the_draft_and_keep_their_length(tiny_model_dir) -> None:
    prompts = random_prompts(3, seed=61)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, ignore_eos=True)
    llm, ours = _speculate(tiny_model_dir, tiny_model_dir, prompts, params)
    assert [len(t) for t in ours] == [12, 12, 12]
    assert all(0 <= t < VOCAB_SIZE for tokens in ours for t in tokens)
    assert llm.engine.stats().num_accepted_tokens > 0


def test_proposals_stop_at_max_model_len(tiny_model_dir) -> None:
    llm = make_llm(
        tiny_model_dir, max_model_len=24, speculative_config={"model": str(tiny_model_dir), "num_speculative_tokens": 4}
    )
    proposer = llm.engine.proposer
    assert len(proposer.propose(list(range(10)))) == 4
    assert len(proposer.propose(list(range(22)))) == 2
    assert proposer.propose(list(range(24))) == []
    prompt = random_prompts(1, seed=62, min_len=18, max_len=18)[0]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    plain = make_llm(tiny_model_dir, max_model_len=24).generate(
        {"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    )
    assert out[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    assert len(out[0].outputs[0].token_ids) == 6


def test_drafts_stay_within_a_small_pool(tiny_model_dir) -> None:
    """A pool shorter than max_model_len bounds a request without max_tokens; the draft drafts
    no further than the model can verify, and leaves nothing behind."""
    prompt = random_prompts(1, seed=64, min_len=20, max_len=20)[0]
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    options = {"num_kv_blocks": 9, "max_model_len": 256}
    plain = make_llm(tiny_model_dir, **options).generate({"prompt_token_ids": prompt}, params)
    spec = {"model": str(tiny_model_dir), "num_speculative_tokens": 4}
    llm = make_llm(tiny_model_dir, speculative_config=spec, **options)
    ours = llm.generate({"prompt_token_ids": prompt}, params)
    assert ours[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    assert len(ours[0].outputs[0].token_ids) == 13
    draft = llm.engine.proposer.engine
    assert not draft.has_unfinished_requests()
    stats = draft.stats()  # latencies since the last round: none, they are dropped after each
    assert stats.time_to_first_token == [] and stats.inter_token_latency == []


def test_a_draft_with_a_shorter_context_drafts_within_it(tiny_model_dir, tmp_path) -> None:
    draft = _save_draft(tmp_path / "draft", max_position_embeddings=32)
    llm = make_llm(tiny_model_dir, speculative_config={"model": str(draft), "num_speculative_tokens": 4})
    proposer = llm.engine.proposer
    assert proposer.max_model_len == 32
    assert len(proposer.propose(list(range(30)))) == 2
    assert proposer.propose(list(range(40))) == []
    prompt = random_prompts(1, seed=65, min_len=26, max_len=26)[0]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    plain = make_llm(tiny_model_dir).generate({"prompt_token_ids": prompt}, params)
    assert llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0].token_ids == plain[0].outputs[0].token_ids


def test_a_draft_with_another_vocabulary_is_refused(tiny_model_dir, tmp_path) -> None:
    draft = _save_draft(tmp_path / "draft", vocab_size=VOCAB_SIZE + 8)
    with pytest.raises(ValueError, match="must share the model's tokenizer"):
        make_llm(tiny_model_dir, speculative_config={"model": str(draft), "num_speculative_tokens": 2})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"draft_tensor_parallel_size": 2}, "draft_tensor_parallel_size=2: must be 1: the draft runs whole on rank 0"),
        ({"draft_tensor_parallel_size": True}, "draft_tensor_parallel_size=True: must be 1"),
        ({"method": "ngram", "model": None, "draft_tensor_parallel_size": 1}, "=1: is the draft model's"),
    ],
)
def test_a_draft_runs_on_one_device_only(tiny_model_dir, spec, message) -> None:
    config = {"model": str(tiny_model_dir), "num_speculative_tokens": 2, **spec}
    with pytest.raises(ValueError, match=re.escape(message)):
        SpeculativeConfig.parse(config)
    assert SpeculativeConfig.parse({**config, "draft_tensor_parallel_size": None}) is not None


def test_a_missing_draft_model_is_named_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch) -> None:
    def load_nothing(*args, **kwargs):
        raise AssertionError("the model's weights loaded before the draft model was checked")

    monkeypatch.setattr("neuron_llm.llm.make_executor", load_nothing)
    with pytest.raises(FileNotFoundError, match=r"draft model .*nope: model path .* does not exist"):
        make_llm(tiny_model_dir, speculative_config={"model": str(tmp_path / "nope"), "num_speculative_tokens": 2})


def test_a_draft_must_share_the_models_tokenizer(tiny_model_dir, tmp_path) -> None:
    # Both tokenizers cover the models' 256 ids; only the second maps them as the model's does.
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    byte_level_bpe().save_pretrained(model_dir)
    other = _save_draft(tmp_path / "other")
    sentencepiece_bpe().save_pretrained(other)
    with pytest.raises(ValueError, match="tokenizer maps tokens to other ids than the model's"):
        make_llm(model_dir, speculative_config={"model": str(other), "num_speculative_tokens": 2})
    same = _save_draft(tmp_path / "same")
    byte_level_bpe().save_pretrained(same)
    llm = make_llm(model_dir, speculative_config={"model": str(same), "num_speculative_tokens": 2})
    assert isinstance(llm.engine.proposer, DraftModelProposer)


def test_the_draft_model_method_follows_from_a_model() -> None:
    config = SpeculativeConfig.parse('{"model": "draft", "num_speculative_tokens": 2}')
    assert config.method == "draft_model" and config.model == "draft"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"method": "draft_model", "num_speculative_tokens": 2}, "which needs one"),
        ({"method": "ngram", "model": "draft", "num_speculative_tokens": 2}, "needs method 'draft_model'"),
        ({"quantization": "int8", "num_speculative_tokens": 2}, r"^speculative_config\.quantization='int8'"),
        ({"model": 5, "num_speculative_tokens": 2}, r"^speculative_config\.model=5: must be the draft model's path"),
        ({"model": "", "num_speculative_tokens": 2}, r"^speculative_config\.model=''"),
        ({"model": "d", "quantization": 8, "num_speculative_tokens": 2}, r"quantization=8: must be a preset name"),
        ({"model": "draft", "prompt_lookup_max": 2, "num_speculative_tokens": 2}, "is for method 'ngram'"),
    ],
)
def test_bad_draft_configs_are_named(value, message) -> None:
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.parse(value)


def test_the_draft_steps_in_the_models_sizes_and_chunks_long_sequences(tiny_model_dir) -> None:
    """The draft takes the model's step budget; with chunked prefill off for the model, a
    sequence grown past that budget is still drafted (chunked by the draft)."""
    prompt = random_prompts(1, seed=64, min_len=14, max_len=14)[0]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    options = {"max_num_batched_tokens": 16, "enable_chunked_prefill": False}
    plain = make_llm(tiny_model_dir, **options).generate({"prompt_token_ids": prompt}, params)
    speculative = {"model": str(tiny_model_dir), "num_speculative_tokens": 3}
    llm = make_llm(tiny_model_dir, speculative_config=speculative, **options)
    draft = llm.engine.proposer.engine
    assert draft.config.scheduler.max_num_batched_tokens == 16
    ours = llm.generate({"prompt_token_ids": prompt}, params)
    assert ours[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    assert llm.engine.stats().num_accepted_tokens > 0
