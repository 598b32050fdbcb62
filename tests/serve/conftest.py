"""A tiny random Llama with a real tokenizer and chat template, and servers on 127.0.0.1 around it.

Servers run in this process (uvicorn in a thread, on a socket bound to a free port) unless a
test needs signals, which only a subprocess can take. Every server stops when its fixture ends.
"""

from __future__ import annotations

import itertools
import json
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn

from neuron_llm.llm import LLM
from neuron_llm.serve import ServeSettings, create_app

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, how are you today? I am fine, thank you.",
    "A paged KV cache holds keys and values in fixed-size blocks.",
    "Once upon a time there was a small language model that served requests.",
]
START_TIMEOUT_S = 30.0


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    # On a small shared machine, torch's intra-op threads spin against the server's own
    # threads and other processes; one thread keeps these tests fast and their timing sane.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face directory: byte-level BPE tokenizer with a chat template, random tiny Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(_CORPUS * 10, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>", chat_template=CHAT_TEMPLATE)
    path = tmp_path_factory.mktemp("tiny-chat-llama")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        # Peaked logits keep greedy picks far from ties, so batching cannot flip them.
        initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def extra_token_model_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model_dir`` whose tokenizer has one added token, ``<extra>``, that the model has no embedding for."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("extra-token-llama")
    shutil.copytree(model_dir, path, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(path)
    return path


def make_llm(model_dir: Path, **options: Any) -> LLM:
    """An ``LLM`` on the tiny model: fp32, small blocks, short context unless overridden."""
    options = {"num_kv_blocks": 1024, "block_size": 4, "max_model_len": 256, **options}
    return LLM(model=str(model_dir), dtype="float32", **options)


def make_slow_llm(model_dir: Path, step_s: float = 0.01, **options: Any) -> LLM:
    """``make_llm`` whose engine steps take at least ``step_s``: a request of a few hundred tokens
    then lasts seconds, long enough for a client to leave or a signal to arrive in the middle."""
    llm = make_llm(model_dir, **options)
    step = llm.engine.step

    def slow_step() -> list[Any]:
        time.sleep(step_s)
        return step()

    llm.engine.step = slow_step  # type: ignore[method-assign]
    return llm


class ServerThread:
    """uvicorn serving ``app`` in a thread of this process, on 127.0.0.1 at a free port."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            assert time.monotonic() < deadline and self._thread.is_alive(), "the server did not start"
            time.sleep(0.01)

    def wait_ready(self) -> None:
        """Wait for ``/ping`` to answer 200 (the model has loaded)."""
        wait_for(lambda: httpx.get(f"{self.url}/ping").status_code == 200, "the model did not load")

    @property
    def model_name(self) -> str:
        """The name the loaded model is served under."""
        return self.app.state.server.ready_model().name

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=START_TIMEOUT_S)
        self._socket.close()
        assert not self._thread.is_alive(), "the server did not stop"


def wait_for(condition: Callable[[], bool], message: str, timeout: float = START_TIMEOUT_S) -> None:
    """Poll ``condition`` until it holds; fail with ``message`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


@contextmanager
def running_server(
    model_dir: Path, load: Callable[[], LLM] | None = None, wait: bool = True, **settings: Any
) -> Iterator[ServerThread]:
    """A started server on the tiny model; ``settings`` are ``ServeSettings`` fields."""
    app = create_app(ServeSettings(model=str(model_dir), **settings), load=load or (lambda: make_llm(model_dir)))
    server = ServerThread(app)
    server.start()
    try:
        if wait:
            server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server(model_dir: Path) -> Iterator[ServerThread]:
    """The shared server: room for 64 concurrent requests."""
    with running_server(model_dir) as running:
        yield running


def leave_once(server: ServerThread, body: dict[str, Any], running: Callable[[], bool], message: str) -> None:
    """POST ``body`` to /v1/completions and close the connection once ``running()`` holds: a
    client timeout could instead fire before the server had read the body, which is no abort."""
    content = json.dumps(body).encode()
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(content)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as connection:
        connection.sendall(head.encode() + content)
        wait_for(running, message)


def metric(server: ServerThread, name: str) -> float:
    """The value of one unlabelled (or fully labelled, e.g. ``x{a="b"}``) sample in ``/metrics``."""
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def unmerged_characters(tokenizer: Any, count: int = 2) -> tuple[list[int], list[str]]:
    """``count`` characters that are one token each and two tokens in any pair: their ids, and
    (for two) the four pairs as bad words, which leave no token after either."""
    for chars in itertools.combinations("0123456789!?;:#%&*+=@^~", count):
        ids = [tokenizer.encode(c, add_special_tokens=False) for c in chars]
        words = [x + y for x in chars for y in chars]
        pairs_apart = all(len(tokenizer.encode(word, add_special_tokens=False)) == 2 for word in words)
        if pairs_apart and all(len(i) == 1 for i in ids):
            return [i[0] for i in ids], words
    raise AssertionError(f"no {count} characters stay apart in this tokenizer")
