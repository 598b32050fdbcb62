"""A compiled artifact serves as its source model does, under the artifact directory's name."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from neuron_llm import LLM
from neuron_llm.compile.build import compile_artifact
from neuron_llm.sampling_params import SamplingParams
from neuron_llm.serve.settings import ServeSettings
from tests.serve.conftest import make_llm, running_server


def test_a_compiled_artifact_serves_chat_as_its_source_does(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny-compiled"
    compile_artifact(str(model_dir), out, dtype="float32", block_size=4, max_model_len=256)
    messages = [{"role": "user", "content": "hello there"}]
    source = make_llm(model_dir)
    expected = source.chat(messages, SamplingParams(max_tokens=16, temperature=0.0))[0].outputs[0].text
    source.shutdown()
    settings = ServeSettings(model=str(out))  # device, dtype and the rest left to the artifact

    with running_server(out, load=lambda: LLM(**settings.llm_options())) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
        assert [model.id for model in client.models.list().data] == ["tiny-compiled"]
        reply = client.chat.completions.create(model="tiny-compiled", messages=messages, max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == expected


def test_serve_refuses_an_option_the_artifact_was_not_compiled_with_before_it_listens(
    model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tiny-compiled"
    compile_artifact(str(model_dir), out, dtype="float32", block_size=4, max_model_len=256)
    ServeSettings(model=str(out), max_model_len=256, dtype="float32").check_model()
    for option, value in [("max_model_len", 128), ("dtype", "bfloat16"), ("max_num_seqs", 3)]:
        with pytest.raises(ValueError, match=f"{option}=.*compiled with {option}="):
            ServeSettings(model=str(out), **{option: value}).check_model()
    (out / "added_tokens.json").write_text("{}")  # a file the tokenizer would read, added after compiling
    with pytest.raises(ValueError, match="added_tokens.json: not a file the artifact was compiled with"):
        ServeSettings(model=str(out)).check_model()
    (out / "added_tokens.json").unlink()
    (out / "graphs" / "kernel.cubin").parent.mkdir(exist_ok=True)
    (out / "graphs" / "kernel.cubin").write_bytes(b"")  # its graphs are checked too
    with pytest.raises(ValueError, match="kernel.cubin: not a file the artifact was compiled with"):
        ServeSettings(model=str(out)).check_model()
