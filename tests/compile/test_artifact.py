"""Compile, then load: an artifact generates what its source does, and a mismatch is refused."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from neuron_llm import LLM, SamplingParams
from neuron_llm.cli import main
from neuron_llm.compile.artifact import (
    FORMAT_VERSION,
    GRAPHS_DIR,
    MANIFEST_NAME,
    NEURON_CACHE,
    TRITON_CACHE,
    WEIGHTS_DIR,
    Artifact,
    cache_files,
    fixed_options,
    graph_cache,
    is_artifact,
    sealed,
    sha256_of,
    system_versions,
)
from neuron_llm.compile.build import compile_artifact
from neuron_llm.quant import loading
from neuron_llm.quant.layers import quantized_linears
from neuron_llm.serve.settings import ServeSettings
from neuron_llm.worker import load_worker
from tests.quant.conftest import save_word_tokenizer

OPTIONS = {"max_model_len": 128, "max_num_seqs": 4, "block_size": 8}
PROMPTS = [{"prompt_token_ids": [1, 2, 3, 4, 5]}, {"prompt_token_ids": [7] * 19}, {"prompt_token_ids": [200]}]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def greedy_tokens(llm: LLM) -> list[list[int]]:
    try:
        return [list(output.outputs[0].token_ids) for output in llm.generate(PROMPTS, GREEDY)]
    finally:
        llm.shutdown()


@pytest.fixture
def source(save_tiny_llama: Callable[..., tuple[Any, Path]]) -> Path:
    _, path = save_tiny_llama()
    return path


def refuse_loading_the_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any load of a checkpoint (and so any quantizing on load) fail: an artifact needs neither."""

    def refused(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the artifact's load read a checkpoint")

    monkeypatch.setattr(loading, "load_any_format", refused)


@pytest.mark.parametrize(
    ("quantization", "tied"),
    [(None, False), ("int8", False), ("int8-g128", False), ("int8-head", True), ("fp8-all", False), ("w8a8", False)],
)
def test_an_artifact_generates_what_its_source_does(
    save_tiny_llama: Callable[..., tuple[Any, Path]],
    tmp_path: Path,
    quantization: str | None,
    tied: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # int8-g128 on 64 features: one short group, which our layers run and the artifact stores.
    _, source = save_tiny_llama(tie_word_embeddings=tied)
    expected_llm = LLM(str(source), quantization=quantization, **OPTIONS)
    expected_bytes = expected_llm.weight_bytes
    expected = greedy_tokens(expected_llm)
    out = tmp_path / "artifact"
    manifest = compile_artifact(str(source), out, quantization=quantization, **OPTIONS)
    assert is_artifact(out)
    assert manifest["options"]["quantization"] == quantization
    assert manifest["options"]["max_model_len"] == 128
    assert list(manifest["weights"]) == ["rank-0-of-1.safetensors"]

    refuse_loading_the_source(monkeypatch)
    llm = LLM(str(out))
    # The options it was compiled with, and its weights in their compiled form.
    assert llm.config.max_model_len == 128
    assert llm.config.cache.block_size == 8
    assert llm.config.quantization == quantization
    assert llm.weight_bytes == expected_bytes
    model = llm._executor.worker.model
    assert bool(quantized_linears(model)) == (quantization is not None)
    assert greedy_tokens(llm) == expected


def test_an_artifact_keeps_named_chat_templates(source: Path, tmp_path: Path) -> None:
    save_word_tokenizer(source)
    templates = {"default": "{{ messages[0]['content'] }}", "tool_use": "tools: {{ tools | length }}"}
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    tokenizer.chat_template = templates
    tokenizer.save_pretrained(str(source))  # transformers 5: additional_chat_templates/tool_use.jinja
    out = tmp_path / "artifact"
    compile_artifact(str(source), out, **OPTIONS)
    llm = LLM(str(out), warm_up=False)
    assert llm.tokenizer is not None and llm.tokenizer.chat_template == templates
    llm.shutdown()


def test_a_tensor_parallel_artifact_holds_one_file_per_rank(source: Path, tmp_path: Path) -> None:
    expected = greedy_tokens(LLM(str(source), quantization="int8", **OPTIONS))
    out = tmp_path / "artifact"
    manifest = compile_artifact(str(source), out, quantization="int8", tensor_parallel_size=2, **OPTIONS)
    assert sorted(manifest["weights"]) == ["rank-0-of-2.safetensors", "rank-1-of-2.safetensors"]
    llm = LLM(str(out))
    assert llm.config.parallel.tensor_parallel_size == 2
    assert greedy_tokens(llm) == expected


@pytest.fixture
def compiled(source: Path, tmp_path: Path) -> Path:
    out = tmp_path / "artifact"
    compile_artifact(str(source), out, **OPTIONS)
    return out


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("dtype", "bfloat16"),
        ("tensor_parallel_size", 2),
        ("quantization", "int8"),
        ("max_num_seqs", 8),
        ("max_model_len", 64),
        ("block_size", 16),
        ("backend", "neuron"),
    ],
)
def test_an_option_the_artifact_fixes_cannot_change(compiled: Path, option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"{option}=.*compiled with {option}="):
        LLM(str(compiled), **{option: value})


def test_options_it_does_not_fix_are_free_and_equal_ones_are_taken(compiled: Path) -> None:
    llm = LLM(str(compiled), dtype="float32", device="cpu:0", max_num_seqs=4, enable_prefix_caching=False)
    assert llm.config.cache.enable_prefix_caching is False
    assert llm.config.scheduler.max_num_seqs == 4
    llm.shutdown()


def edit_manifest(path: Path, edit: Callable[[dict[str, Any]], None], seal: bool = True) -> None:
    """Edit ``path``'s manifest; sealed with its new sha256, as if compiled so, unless ``seal`` is False."""
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    edit(manifest)
    (path / MANIFEST_NAME).write_text(json.dumps(sealed(manifest) if seal else manifest))


def test_another_library_version_is_refused(compiled: Path) -> None:
    edit_manifest(compiled, lambda m: m["system"].update(torch="1.0.0"))
    with pytest.raises(ValueError, match="compiled with torch 1.0.0, this system has"):
        LLM(str(compiled))


def test_a_library_the_artifact_was_built_without_is_refused(compiled: Path) -> None:
    # As an artifact built on torch-xla's CPU device (no neuronx-cc, so no NEFFs) on a Neuron host.
    edit_manifest(compiled, lambda m: m["system"].pop("torch"))
    with pytest.raises(ValueError, match="compiled with torch none, this system has"):
        LLM(str(compiled))


def test_an_artifact_for_a_device_this_system_lacks_is_refused(compiled: Path) -> None:
    edit_manifest(compiled, lambda m: m["options"].update(device="cuda", backend="cuda"))
    edit_manifest(compiled, lambda m: m["system"].update(triton="0.0", cuda_capability="9.0"))
    with pytest.raises(ValueError, match="compiled with (triton 0.0|cuda_capability 9.0), this system has"):
        LLM(str(compiled))


def test_an_xla_artifact_where_torch_xla_is_missing_is_refused_for_it(
    compiled: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    find_spec = importlib.util.find_spec

    def without_torch_xla(name: str, *args: Any) -> Any:
        return None if name == "torch_xla" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_torch_xla)
    assert "torch_xla" not in system_versions("xla", "neuron")
    edit_manifest(compiled, lambda m: m["system"].update(torch_xla="2.9.0"))
    with pytest.raises(ValueError, match="compiled with torch_xla 2.9.0, this system has none"):
        Artifact.open(compiled).check_system("cpu")


def test_a_checkpoint_with_a_manifest_of_another_tool_is_no_artifact(source: Path, tmp_path: Path) -> None:
    (source / MANIFEST_NAME).write_text(json.dumps({"name": "another tool", "files": []}))
    assert not is_artifact(source)
    expected = greedy_tokens(LLM(str(source), **OPTIONS))
    compile_artifact(str(source), tmp_path / "artifact", **OPTIONS)
    assert greedy_tokens(LLM(str(tmp_path / "artifact"))) == expected
    # Ours, damaged past parsing, is still refused as an artifact.
    (source / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not a readable artifact manifest"):
        LLM(str(source))


def test_a_quantization_other_than_a_preset_name_is_refused_before_building(source: Path, tmp_path: Path) -> None:
    from neuron_llm.quant.config import QuantConfig

    with pytest.raises(ValueError, match="an artifact is compiled from a preset's name"):
        compile_artifact(str(source), tmp_path / "artifact", quantization=QuantConfig.for_scheme("int8"), **OPTIONS)
    assert not (tmp_path / "artifact").exists()


def test_a_path_from_home_is_an_artifact_too(compiled: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(compiled.parent))
    edit_manifest(compiled, lambda m: m["system"].update(torch="1.0.0"))
    with pytest.raises(ValueError, match="compiled with torch 1.0.0"):
        LLM(f"~/{compiled.name}")


def test_a_worker_refuses_an_engine_built_with_other_options(compiled: Path) -> None:
    # Whatever builds the engine's config, the artifact's weights load only under its own options.
    config = LLM(str(compiled), warm_up=False).config
    other = replace(config, scheduler=replace(config.scheduler, max_num_seqs=2))
    with pytest.raises(ValueError, match=r"other options than this engine's: \['max_num_seqs'\]"):
        load_worker(str(compiled), other, 0, 1)
    # An option the artifact did not record (an older neuron-llm's) is named too, not taken as None.
    edit_manifest(compiled, lambda m: m["options"].pop("quantization"))
    with pytest.raises(ValueError, match="its options record no 'quantization': damaged, or compiled by an older"):
        LLM(str(compiled))


@pytest.mark.parametrize(("version", "advice"), [(99, "upgrade neuron-llm"), (1, "compile the model again")])
def test_another_format_version_is_refused(compiled: Path, version: int, advice: str) -> None:
    edit_manifest(compiled, lambda m: m.update(format_version=version))
    reads = f"this neuron-llm reads 3 to {FORMAT_VERSION}"
    with pytest.raises(ValueError, match=f"format_version {version}; {reads}: {advice}"):
        LLM(str(compiled))


@pytest.mark.parametrize(
    "edit",
    [lambda m: m["options"].update(quantization="int8"), lambda m: m["files"].pop("config.json")],
    ids=["an-option", "a-file-record"],
)
def test_an_edited_manifest_is_refused(compiled: Path, edit: Any, capsys: pytest.CaptureFixture) -> None:
    edit_manifest(compiled, edit, seal=False)
    with pytest.raises(ValueError, match="manifest.json: its sha256 differs from its contents: damaged or edited"):
        LLM(str(compiled), quantization="int8")
    assert main(["verify", str(compiled)]) == 2
    assert "its sha256 differs from its contents" in capsys.readouterr().err


def test_an_edited_manifest_is_refused_under_an_older_format_version(compiled: Path) -> None:
    edit_manifest(compiled, lambda m: m.update(format_version=3) or m["options"].update(max_model_len=64), seal=False)
    with pytest.raises(ValueError, match="manifest.json: its sha256 differs from its contents: damaged or edited"):
        LLM(str(compiled))


def test_a_manifest_of_format_3_loads_without_its_own_sha256(compiled: Path) -> None:
    expected = greedy_tokens(LLM(str(compiled)))
    edit_manifest(compiled, lambda m: m.update(format_version=3), seal=False)
    edit_manifest(compiled, lambda m: m.pop("sha256"), seal=False)
    assert greedy_tokens(LLM(str(compiled))) == expected


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["options"].pop("backend"), "its options record no 'backend'"),
        (lambda m: m["weights"]["rank-0-of-1.safetensors"].pop("header_sha256"), "has no header_sha256"),
    ],
    ids=["option", "header"],
)
def test_a_manifest_missing_a_key_is_refused_by_name(compiled: Path, edit: Any, message: str) -> None:
    edit_manifest(compiled, edit)
    with pytest.raises(ValueError, match=re.escape(message)):
        LLM(str(compiled))


def test_the_manifest_records_every_option_an_artifact_fixes(compiled: Path) -> None:
    assert set(Artifact.open(compiled).options) == set(fixed_options(LLM(str(compiled), warm_up=False).config))


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("chat_template.jinja", "{{ messages[0]['content'] }}"),
        ("generation_config.json", json.dumps({"temperature": 1.5, "top_k": 3})),
        ("tokenizer/extra.txt", "x"),
        # A kernel Triton's cache would take for one compiled with the rest.
        ("graphs/triton/KEY/kernel.cubin", "cubin"),
        ("weights/rank-1-of-2.safetensors", "x"),
    ],
)
def test_a_file_added_after_compiling_is_refused(
    compiled: Path, name: str, text: str, capsys: pytest.CaptureFixture
) -> None:
    if (compiled / name).exists():  # as if compiled from a checkpoint without it
        (compiled / name).unlink()
        edit_manifest(compiled, lambda m: m["files"].pop(name))
        LLM(str(compiled), warm_up=False).shutdown()
    (compiled / name).parent.mkdir(parents=True, exist_ok=True)
    (compiled / name).write_text(text)
    with pytest.raises(ValueError, match=f"{re.escape(name)}: not a file the artifact was compiled with"):
        LLM(str(compiled))
    assert main(["verify", str(compiled)]) == 2
    assert "not a file the artifact was compiled with" in capsys.readouterr().err


def test_a_manifest_without_a_record_is_refused_by_name(compiled: Path) -> None:
    edit_manifest(compiled, lambda m: m.pop("system"))
    with pytest.raises(ValueError, match="damaged, no 'system' record"):
        LLM(str(compiled))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["weights"]["rank-0-of-1.safetensors"].pop("bytes"), "weights['rank-0-of-1.safetensors'] has no"),
        (lambda m: m.update(graphs=["hlo/manifest.json"]), "damaged, no 'graphs' record"),
        (lambda m: m["graphs"].update({"triton/kernel.cubin": {"bytes": 4}}), "graphs['triton/kernel.cubin'] has no"),
    ],
    ids=["weights-record", "graphs-list", "graph-record"],
)
def test_a_manifest_whose_records_are_damaged_is_refused_by_name(compiled: Path, edit: Any, message: str) -> None:
    edit_manifest(compiled, edit)
    with pytest.raises(ValueError, match=re.escape(message)):
        LLM(str(compiled))


@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
def test_damaged_or_missing_weights_are_refused_before_any_rank_starts(
    source: Path, tmp_path: Path, tensor_parallel_size: int
) -> None:
    out = tmp_path / "artifact"
    compile_artifact(str(source), out, tensor_parallel_size=tensor_parallel_size, **OPTIONS)
    # The last rank's: at TP=2 refused as such, not as rank 1's traceback in rank 0's error.
    name = f"rank-{tensor_parallel_size - 1}-of-{tensor_parallel_size}.safetensors"
    weights = out / WEIGHTS_DIR / name
    with weights.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match=f"{re.escape(name)}: .* bytes where the manifest recorded .*: damaged"):
        LLM(str(out))
    weights.unlink()
    for load in (lambda: LLM(str(out)), ServeSettings(model=str(out)).check_model):
        with pytest.raises(ValueError, match=f"{re.escape(name)}: missing"):
            load()


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte of ``path`` in place (its size stays)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_an_edited_model_file_is_refused(compiled: Path) -> None:
    text = (compiled / "config.json").read_text()
    # Another RoPE base of the same length: the file's size stays.
    edited = re.sub(r'("rope_theta": )1', r"\g<1>9", text)
    assert edited != text and len(edited) == len(text)
    (compiled / "config.json").write_text(edited)
    with pytest.raises(ValueError, match="config.json: its sha256 differs from the one compiled"):
        LLM(str(compiled))


def test_a_changed_weights_header_is_refused_at_load_and_changed_tensors_by_verify(
    compiled: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["verify", str(compiled)]) == 0
    assert "file(s) match the manifest" in capsys.readouterr().out
    weights = compiled / WEIGHTS_DIR / "rank-0-of-1.safetensors"
    # The last byte lies in the tensors: loading checks sizes and headers, not the gigabytes.
    flip_byte(weights, weights.stat().st_size - 1)
    LLM(str(compiled), warm_up=False).shutdown()
    assert main(["verify", str(compiled)]) == 2
    assert "rank-0-of-1.safetensors: its sha256 differs" in capsys.readouterr().err
    flip_byte(weights, 20)  # inside the JSON header: a name, dtype, shape or offset
    with pytest.raises(ValueError, match="its tensors' header differs from the one compiled"):
        LLM(str(compiled))


@pytest.mark.parametrize("prefix", [b"\xff" * 7 + b"\x7f", (1 << 60).to_bytes(8, "little")])
def test_a_weights_header_claiming_more_than_the_file_is_refused(compiled: Path, prefix: bytes) -> None:
    weights = compiled / WEIGHTS_DIR / "rank-0-of-1.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = prefix
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="its tensors' header differs from the one compiled"):
        LLM(str(compiled))


def test_weights_that_do_not_fit_the_model_are_refused(compiled: Path) -> None:
    config = json.loads((compiled / "config.json").read_text())
    (compiled / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    # Recorded as if compiled so: the load's own check of the tensors against the model.
    record = {"bytes": (compiled / "config.json").stat().st_size, "sha256": sha256_of(compiled / "config.json")}
    edit_manifest(compiled, lambda m: m["files"].update({"config.json": record}))
    with pytest.raises(ValueError, match="does not fit the model"):
        LLM(str(compiled))


@pytest.mark.parametrize("exists", [False, True])
def test_the_artifact_appears_whole_or_not_at_all(
    exists: bool, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written into a hidden directory, beside a new directory or inside an empty one given,
    and moved into place once whole: a compile killed midway leaves no half-written artifact."""
    out = tmp_path / "artifact"
    if exists:
        out.mkdir()
    seen = []
    shutdown = LLM.shutdown

    def look_before_the_move(llm: LLM) -> None:
        where = out if exists else tmp_path
        beside = sorted(set(os.listdir(tmp_path)) - {source.name})
        seen.append([p.name for p in where.iterdir() if p.name.startswith(".")] + beside)
        shutdown(llm)

    monkeypatch.setattr(LLM, "shutdown", look_before_the_move)
    compile_artifact(str(source), out, **OPTIONS)
    (hidden, *listing), *_ = seen
    assert hidden.startswith(".artifact.compiling-")
    assert listing == (["artifact"] if exists else [hidden]), "nothing but the hidden directory while compiling"
    assert is_artifact(out) and sorted(set(os.listdir(tmp_path)) - {source.name}) == ["artifact"]
    assert not any(p.name.startswith(".") for p in out.iterdir())
    assert out.stat().st_mode & 0o077 == 0o777 & ~current_umask() & 0o077


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_a_failed_compile_leaves_nothing_and_a_full_directory_is_refused(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    with pytest.raises(ValueError, match="tensor_parallel_size=3"):
        compile_artifact(str(source), out, tensor_parallel_size=3, **OPTIONS)
    assert not out.exists() and not list(tmp_path.glob(".artifact.compiling-*"))
    out.mkdir()
    (out / "file").write_text("mine")
    with pytest.raises(ValueError, match="not a new or empty directory"):
        compile_artifact(str(source), out, **OPTIONS)
    assert (out / "file").read_text() == "mine"


@pytest.mark.parametrize("option", [{"warm_up": False}, {"enforce_eager": True}])
def test_a_compile_without_its_graphs_is_refused(source: Path, tmp_path: Path, option: dict) -> None:
    # The warm-up is what compiles them; without CUDA graphs, the artifact would hold fewer.
    with pytest.raises(ValueError, match=f"{next(iter(option))}=.*: compiling an artifact is warming up"):
        compile_artifact(str(source), tmp_path / "artifact", **option, **OPTIONS)
    assert not (tmp_path / "artifact").exists()


def test_a_compile_under_torchrun_is_refused(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each rank would write an artifact of its own shard alone; compile spawns its ranks itself.
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="spawns its tensor-parallel ranks itself: run it without torchrun"):
        compile_artifact(str(source), tmp_path / "artifact", tensor_parallel_size=2, **OPTIONS)
    assert not (tmp_path / "artifact").exists()
    # A launcher of one process (a one-worker job) runs no other rank.
    monkeypatch.setenv("WORLD_SIZE", "1")
    compile_artifact(str(source), tmp_path / "artifact", **OPTIONS)
    assert is_artifact(tmp_path / "artifact")


def test_an_artifact_is_not_compiled_again_nor_read_as_a_checkpoint(compiled: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="compiled artifact already"):
        compile_artifact(str(compiled), tmp_path / "again")
    with pytest.raises(ValueError, match="is a compiled artifact: it loads through an engine"):
        loading.load_any_format(compiled, dtype="float32", device="cpu")


def test_the_triton_cache_is_pointed_at_a_private_copy_while_loading(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    kernels = tmp_path / GRAPHS_DIR / TRITON_CACHE / "key"
    kernels.mkdir(parents=True)
    (kernels / "kernel.cubin").write_bytes(b"cubin")
    before = os.environ.get("TRITON_CACHE_DIR")
    with graph_cache(tmp_path, "cuda", loading=True) as cache:
        assert cache is not None and os.environ["TRITON_CACHE_DIR"] == str(cache)
        assert cache_files(cache) == {"key/kernel.cubin"}
        (cache / "key" / "new.cubin").write_bytes(b"compiled at load")
    assert os.environ.get("TRITON_CACHE_DIR") == before
    assert cache_files(tmp_path / GRAPHS_DIR) == {f"{TRITON_CACHE}/key/kernel.cubin"}
    # Spawned ranks inherited the copy's path: it lives as long as the process, then goes.
    assert cache_files(cache) == {"key/kernel.cubin", "key/new.cubin"}
    load = (
        "import sys; from pathlib import Path; from neuron_llm.compile.artifact import graph_cache\n"
        "with graph_cache(Path(sys.argv[1]), 'cuda', loading=True) as cache:\n    print(cache)"
    )
    done = subprocess.run([sys.executable, "-c", load, str(tmp_path)], capture_output=True, text=True, check=True)
    copy = Path(done.stdout.strip().splitlines()[-1])
    assert copy.name.startswith("neuron-llm-triton-") and not copy.exists()


def test_the_neuron_cache_is_linked_into_a_private_cache_while_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NEURON_CC_FLAGS", raising=False)
    module = tmp_path / GRAPHS_DIR / NEURON_CACHE / "neuronxcc-2.0" / "MODULE_1+abc"
    module.mkdir(parents=True)
    (module / "model.neff").write_bytes(b"neff")
    with graph_cache(tmp_path, "xla") as cache:
        assert cache == tmp_path / GRAPHS_DIR / NEURON_CACHE  # building writes the artifact's own
    with graph_cache(tmp_path, "xla", loading=True) as cache:
        assert cache is not None and os.environ["NEURON_COMPILE_CACHE_URL"] == str(cache)
        assert cache_files(cache) == {"neuronxcc-2.0/MODULE_1+abc/model.neff"}
        linked = cache / "neuronxcc-2.0" / "MODULE_1+abc"
        assert (linked / "model.neff").read_bytes() == b"neff" and not linked.is_symlink()
        # A lock beside a cached NEFF, and a graph the artifact lacked, stay out of the artifact.
        (linked / "model.lock").write_bytes(b"")
        (cache / "neuronxcc-2.0" / "MODULE_2+abc").mkdir()
        (cache / "neuronxcc-2.0" / "MODULE_2+abc" / "model.neff").write_bytes(b"compiled at load")
    assert "NEURON_COMPILE_CACHE_URL" not in os.environ
    assert cache_files(tmp_path / GRAPHS_DIR) == {f"{NEURON_CACHE}/neuronxcc-2.0/MODULE_1+abc/model.neff"}
    assert (module / "model.neff").read_bytes() == b"neff"


def test_overlapping_caches_leave_the_newest_open_one_pointed_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two LLMs of different artifacts, the first shut down (or collected) while the second runs.
    monkeypatch.delenv("NEURON_CC_FLAGS", raising=False)
    monkeypatch.setenv("NEURON_COMPILE_CACHE_URL", "/var/tmp/neuron-compile-cache")
    first = graph_cache(tmp_path / "a", "xla", loading=True)
    second = graph_cache(tmp_path / "b", "xla", loading=True)
    first_cache, second_cache = first.__enter__(), second.__enter__()
    first.__exit__(None, None, None)
    assert os.environ["NEURON_COMPILE_CACHE_URL"] == str(second_cache) != str(first_cache)
    second.__exit__(None, None, None)
    assert os.environ["NEURON_COMPILE_CACHE_URL"] == "/var/tmp/neuron-compile-cache"


@pytest.mark.parametrize("flags", ["--cache_dir=/var/tmp/elsewhere -O1", "-O1 --no_cache"])
def test_neuron_flags_that_replace_the_artifacts_cache_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: str
) -> None:
    monkeypatch.setenv("NEURON_CC_FLAGS", flags)
    for at_load in (False, True):
        with pytest.raises(ValueError, match="NEURON_CC_FLAGS holds --(cache_dir=/var/tmp/elsewhere|no_cache): an"):
            with graph_cache(tmp_path, "xla", loading=at_load):
                pass
    assert "NEURON_COMPILE_CACHE_URL" not in os.environ


def test_neuron_flags_are_recorded_and_other_ones_refused(compiled: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEURON_CC_FLAGS", " --model-type=transformer   -O1 ")
    assert system_versions("xla", "neuron")["NEURON_CC_FLAGS"] == "--model-type=transformer -O1"
    assert "NEURON_CC_FLAGS" not in system_versions("cpu", "torch")
    edit_manifest(compiled, lambda m: m["system"].update(NEURON_CC_FLAGS="-O1"))
    with pytest.raises(
        ValueError,
        match="compiled with NEURON_CC_FLAGS -O1, this system has --model-type=transformer -O1: "
        "set NEURON_CC_FLAGS as when compiling, or compile",
    ):
        Artifact.open(compiled).check_system("xla")
    monkeypatch.setenv("NEURON_CC_FLAGS", "-O1")
    Artifact.open(compiled).check_system("xla")


def test_the_compile_command_writes_an_artifact(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "artifact"
    args = ["compile", "--model", str(source), "--out", str(out), "--max-model-len", "128", "--max-num-seqs", "4"]
    assert main(args + ["--quantization", "int8", "--block-size", "8"]) == 0
    assert "1 weight file(s)" in capsys.readouterr().out
    options = json.loads((out / MANIFEST_NAME).read_text())["options"]
    assert (options["quantization"], options["max_num_seqs"], options["block_size"]) == ("int8", 4, 8)
    # Readable by whoever the umask lets read the rest (safetensors alone writes 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert {path.stat().st_mode & 0o777 for path in out.rglob("*") if path.is_file()} == {0o666 & ~umask}
    assert main(args) == 2
    assert "is not empty; choose a new or empty directory" in capsys.readouterr().err
    other = [arg if arg != str(out) else str(tmp_path / "speculative") for arg in args]
    assert main(other + ["--speculative-config", '{"num_speculative_tokens": 2}']) == 2
    assert "speculative_config is chosen when a cpu artifact is loaded" in capsys.readouterr().err
    assert not (tmp_path / "speculative").exists()
    assert main(other + ["--num-kv-blocks", "3"]) == 2
    assert "num_kv_blocks is chosen when a cpu artifact is loaded" in capsys.readouterr().err
    assert main(other + ["--sampling-features", "logprobs, top_k"]) == 2
    assert "sampling_features: unknown ['top_k']" in capsys.readouterr().err
    assert main(other + ["--sampling-features", "logprobs,penalties"]) == 2
    assert "only the XLA device compiles a sampling graph per feature set" in capsys.readouterr().err
    assert main(other + ["--context-buckets", "32,64"]) == 2
    assert "only the XLA device pads block tables to context lengths" in capsys.readouterr().err
    assert main(other + ["--context-buckets", "32,6x"]) == 2
    assert "context_buckets='32,6x': must be comma-separated integers" in capsys.readouterr().err


@pytest.mark.parametrize("proposer", [{"model": "DRAFT"}, {"prompt_lookup_max": 2}])
def test_an_artifact_compiles_the_number_of_proposals_alone(source: Path, tmp_path: Path, proposer: dict) -> None:
    """The proposer is chosen at load: compiled in, a draft model would load as n-gram lookup."""
    speculative = {"num_speculative_tokens": 2, **{k: str(source) if v == "DRAFT" else v for k, v in proposer.items()}}
    with pytest.raises(ValueError, match="an artifact compiles num_speculative_tokens alone"):
        compile_artifact(str(source), tmp_path / "out", device="xla", num_kv_blocks=40, speculative_config=speculative)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_default_model_compiles_and_generates_from_its_artifact(tmp_path: Path) -> None:
    out = tmp_path / "smollm2"
    compile_artifact(None, out, max_model_len=256)
    reference = greedy_tokens(LLM(max_model_len=256))
    llm = LLM(str(out))
    assert llm.tokenizer is not None and llm.tokenizer.chat_template
    assert greedy_tokens(llm) == reference


def test_a_cuda_compile_is_refused_in_a_process_that_ran_a_cuda_model(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("triton")
    from neuron_llm.backends.cuda import backend

    before = backend.models_prepared()
    backend.CudaBackend().prepare_model(LLM(str(source), device="cpu").engine.runner.executor.worker.model)
    assert backend.models_prepared() == before + 1
    monkeypatch.setattr(backend, "_models_prepared", 1)
    with pytest.raises(ValueError, match="run a model on CUDA already"):
        compile_artifact(str(source), tmp_path / "artifact", device="cuda")
    assert not (tmp_path / "artifact").exists()
