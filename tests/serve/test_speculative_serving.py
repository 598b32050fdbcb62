"""A server with speculative decoding: steps that add several tokens stream the same text and
logprobs as plain decoding, and /metrics counts the proposals."""

from __future__ import annotations

from pathlib import Path

import openai

from neuron_llm.sampling_params import SamplingParams
from tests.engine.conftest import OracleProposer
from tests.serve.conftest import make_llm, metric, running_server


def test_streamed_speculative_completion_equals_plain_decoding(model_dir: Path) -> None:
    prompt = [5, 80, 81, 82, 200, 17, 33]
    greedy = {"temperature": 0.0, "max_tokens": 20, "logprobs": 2}
    plain = make_llm(model_dir)
    written = plain.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=20, temperature=0.0))[0]

    def load():
        llm = make_llm(model_dir, speculative_config={"num_speculative_tokens": 3})
        continuations = {tuple(prompt): written.outputs[0].token_ids}
        llm.engine.proposer = OracleProposer(continuations, "mixed", k=3, vocab_size=plain.config.model.vocab_size)
        return llm

    with running_server(model_dir, load=load) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
        model = client.models.list().data[0].id
        whole = client.completions.create(model=model, prompt=prompt, **greedy).choices[0]
        chunks = list(client.completions.create(model=model, prompt=prompt, stream=True, **greedy))
        drafts, kept = (metric(server, f"neuron_llm_spec_decode_{name}_tokens_total") for name in ("draft", "accepted"))
    assert whole.text == written.outputs[0].text
    streamed = [choice for chunk in chunks for choice in chunk.choices]
    assert "".join(choice.text for choice in streamed) == whole.text
    assert [t for choice in streamed for t in choice.logprobs.tokens] == whole.logprobs.tokens
    # Fewer chunks than tokens: steps that kept proposals sent several tokens at once.
    assert len([c for c in streamed if c.text]) < len(whole.logprobs.tokens)
    assert 0 < kept < drafts
