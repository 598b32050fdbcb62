"""The model's tokenizer, its chat template and its end-of-sequence tokens.

Tokenizers load through transformers' ``AutoTokenizer`` from local files only (a model
directory, or the vocabulary inside a GGUF file): no model hub is ever contacted. A tokenizer
read is kept per path and per state of its files (reading one from a GGUF file takes
seconds, and the engine front end and an in-process model load both ask for it); each
caller gets its own copy, so changing one changes no other, and a file changed on disk is
read again.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import inspect
import json
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from tokenizers import Tokenizer, decoders, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

from neuron_llm.loader.gguf_file import TokenizerDefaults

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
"""``developer`` is OpenAI's newer name for ``system``, and is rendered as one."""
CHAT_TEMPLATES_DIR = "additional_chat_templates"
"""Where transformers saves named chat templates (``tool_use`` and others) but the default, one file each."""
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
"""The parameters schema of a function declared without any, as templates read it."""
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
"""The files that hold a vocabulary; a tokenizer_config.json alone builds an empty tokenizer."""


def has_tokenizer_files(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a file a Hugging Face tokenizer reads its vocabulary from."""
    return any((model_dir / name).is_file() for name in _TOKENIZER_FILES)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def _files_state(paths: Iterable[Path]) -> tuple[tuple[str, int, int], ...]:
    """Name, modification time and size of each file: a cache key that changes with them."""
    state = []
    for path in paths:
        stat = path.stat()
        state.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(sorted(state))


def load_dir_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in the Hugging Face model directory ``model_dir`` (a copy of its own)."""
    files = [
        path
        for folder in (model_dir, model_dir / CHAT_TEMPLATES_DIR)
        if folder.is_dir()
        for path in folder.iterdir()
        if path.is_file() and path.suffix not in _WEIGHT_SUFFIXES
    ]
    return copy.deepcopy(_read_dir_tokenizer(model_dir, _files_state(files)))


_DAMAGED_TOKENIZER_ERRORS = (ValueError, KeyError, IndexError, TypeError, OSError)
"""What transformers raises on a damaged tokenizer file or GGUF vocabulary, in its own words."""


@functools.lru_cache(maxsize=4)
def _read_dir_tokenizer(model_dir: Path, files_state: tuple[tuple[str, int, int], ...]) -> PreTrainedTokenizerBase:
    if not has_tokenizer_files(model_dir):
        raise FileNotFoundError(f"no tokenizer in {model_dir}: expected one of {', '.join(_TOKENIZER_FILES)}")
    if not (model_dir / "tokenizer.json").is_file() and (model_dir / "tokenizer.model").is_file():
        # transformers converts it, and without these packages fails with an unrelated message.
        missing = [name for name in ("sentencepiece", "google.protobuf") if importlib.util.find_spec(name) is None]
        if missing:
            raise ValueError(
                f"{model_dir} holds a SentencePiece tokenizer.model and no tokenizer.json: reading it needs "
                f"{' and '.join(missing)} (pip install 'neuron-llm[sentencepiece]'), or save the tokenizer "
                "with transformers, which writes a tokenizer.json"
            )
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except _DAMAGED_TOKENIZER_ERRORS as e:
        raise ValueError(f"{model_dir}: its tokenizer files could not be read ({type(e).__name__}: {e})") from e


def load_gguf_tokenizer(gguf_path: Path, defaults: TokenizerDefaults | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer described by the metadata of the GGUF file ``gguf_path`` (a copy of its
    own), with llama.cpp's ``defaults`` (``gguf_file.tokenizer_defaults``) for what the file
    leaves unsaid.

    transformers reads a tokenizer.json beside the GGUF file before the file itself, and a
    GGUF often lies in a folder of another model's files (llama.cpp converts in place): the
    file is read through a link in a folder of its own.
    """
    return copy.deepcopy(_read_gguf_tokenizer(gguf_path, _files_state([gguf_path]), defaults))


@functools.lru_cache(maxsize=4)
def _read_gguf_tokenizer(
    gguf_path: Path, file_state: tuple[tuple[str, int, int], ...], defaults: TokenizerDefaults | None
) -> PreTrainedTokenizerBase:
    with tempfile.TemporaryDirectory(prefix="neuron-llm-gguf-") as folder:
        link = Path(folder) / "model.gguf"
        link.symlink_to(gguf_path.resolve())
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=link.name, local_files_only=True)
        except _DAMAGED_TOKENIZER_ERRORS as e:  # named with the file, not the link
            raise ValueError(f"{gguf_path}: its tokenizer metadata could not be read ({type(e).__name__}: {e})") from e
    if defaults is None:
        return tokenizer
    _restore_added_tokens(tokenizer, defaults.added_tokens)
    if tokenizer.bos_token_id is None and defaults.bos_token_id is not None:
        tokenizer.bos_token = tokenizer.convert_ids_to_tokens(defaults.bos_token_id)
    if tokenizer.eos_token_id is None and defaults.eos_token_id is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(defaults.eos_token_id)
    if tokenizer.add_bos_token != defaults.add_bos_token:
        tokenizer.add_bos_token = defaults.add_bos_token  # rebuilds the post-processor that adds it
    if tokenizer.add_eos_token != defaults.add_eos_token:
        tokenizer.add_eos_token = defaults.add_eos_token
    if defaults.add_space_prefix is not None:
        _prefix_spaces_as_llama_cpp(tokenizer.backend_tokenizer, defaults.add_space_prefix)
    if defaults.ignore_merges:
        tokenizer.backend_tokenizer.model.ignore_merges = True
    return tokenizer


def _restore_added_tokens(tokenizer: PreTrainedTokenizerBase, added_tokens: Sequence[tuple[int, str, bool]]) -> None:
    """Give a byte-level vocabulary's control and user-defined tokens spelt outside its byte
    alphabet their own ids back, whole and (control ones) special, as llama.cpp reads them.

    DeepSeek's (``<｜begin▁of▁sentence｜>``, ``<｜User｜>``) use full-width bars and "▁".
    transformers' reader respells such a token in the byte alphabet, so the text no longer
    matches it, and appends the BOS and EOS the file names as new tokens past the vocabulary:
    every prompt then begins with an id the model's embedding does not have, and the chat
    template's markers are cut into bytes.
    """
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    misread = [
        (token_id, text, special)
        for token_id, text, special in added_tokens
        if not set(text) <= alphabet and tokenizer.convert_tokens_to_ids(text) != token_id
    ]
    if not misread:
        return
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    texts = {text for _, text, _ in misread}
    state["added_tokens"] = [token for token in state["added_tokens"] if token["content"] not in texts]
    for token_id, text, special in misread:
        respelled = "".join(spelling[byte] for byte in text.encode())
        if vocab.get(respelled) == token_id:
            del vocab[respelled]
        vocab[text] = token_id
        state["added_tokens"].append(
            {"id": token_id, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": special}
        )  # fmt: skip
    # Added tokens cannot be removed from a backend in place, nor does transformers offer a
    # setter for it: the rebuilt one replaces the attribute its methods read.
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))
    tokenizer.update_post_processor()  # its BOS and EOS ids were the appended ones


def _prefix_spaces_as_llama_cpp(backend: Tokenizer, add_space_prefix: bool) -> None:
    """Spaces of a SentencePiece vocabulary as llama.cpp (and Llama 2's tokenizer.json) writes
    them: "▁" for every space, and with ``add_space_prefix`` one more before each run of text,
    at the start and after every special token.

    transformers' reader prefixes the first run only, and only when it does not start with a
    space, whatever the file says: "a</s>b" lost the "▁" before "b" that Llama 2 was trained
    with, " x" one of its two. Added tokens split the text before normalizing, so a
    normalizer's prefix goes before each run.
    """
    escape = normalizers.Replace(" ", "▁")
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), escape]) if add_space_prefix else escape
    backend.pre_tokenizer = None
    # The decoder drops the one space the prefix added; without a prefix every space is the text's.
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if add_space_prefix else steps)


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, Any]],
    *,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    **template_kwargs: Any,
) -> str:
    """Render ``messages`` (``{"role", "content"}`` dicts) as a prompt with the model's chat template.

    The prompt ends with the header of the assistant's reply (``add_generation_prompt``), or
    leaves the last message open for the model to continue (``continue_final_message``).
    A content may be a list of ``{"type": "text", "text": ...}`` parts, joined one per line.
    ``chat_template`` replaces the model's; ``template_kwargs`` reach the template as
    variables. ``tools`` reach it as given, but that a function without ``parameters`` (or
    with null ones) takes ``NO_PARAMETERS``, OpenAI's meaning, which templates may read.
    Raises ``ValueError`` when there is no template, a message is malformed, or the template
    refuses the messages (some insist that user and assistant turns alternate) or fails on
    the values given (a number where it expects a string), or the text holds half of a
    surrogate pair.
    """
    # A tokenizer's template may be a dict of named ones, from which transformers picks "default".
    if not (chat_template or tokenizer.chat_template):
        raise ValueError("this model has no chat template; send a plain prompt instead of chat messages")
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message exclude each other")
    messages = _checked_messages(messages)
    if template_kwargs.get("tools"):
        template_kwargs["tools"] = [_with_parameters(tool) for tool in template_kwargs["tools"]]
    try:
        text = tokenizer.apply_chat_template(
            messages,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **template_kwargs,
        )
    except TemplateError as e:
        raise ValueError(f"the model's chat template refused the messages: {e}") from e
    except (TypeError, RuntimeError) as e:
        # The template's own expressions fail on values the request chose (a number where it
        # adds strings, say), or its data nests past Python's recursion limit (RecursionError).
        raise ValueError(f"the model's chat template failed on the request's values: {type(e).__name__}: {e}") from e
    return checked_unicode(text, "the conversation")


@functools.cache
def chat_template_arguments() -> frozenset[str]:
    """Names that reach a chat template's rendering as arguments of the calls on the way
    (``render_chat``'s, transformers' ``apply_chat_template``'s and the renderer's), not as
    variables of the template: template_kwargs under these names reach no template."""
    from transformers.utils import chat_template_utils

    calls = [render_chat, PreTrainedTokenizerBase.apply_chat_template]
    renderer = getattr(chat_template_utils, "render_jinja_template", None)  # not in older transformers
    if renderer is not None:
        calls.append(renderer)
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return frozenset(
        name
        for call in calls
        for name, parameter in inspect.signature(call).parameters.items()
        if parameter.kind not in variadic
    )


def checked_unicode(text: str, what: str) -> str:
    """``text``, or ``ValueError`` where it is not Unicode text a tokenizer can encode.

    A Python string (or JSON) can hold half of a UTF-16 surrogate pair ("\\ud83d", a string
    cut inside an emoji); it is no character, and no UTF-8 encodes it.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} holds a lone UTF-16 surrogate ({text[e.start]!r} at character {e.start}): not Unicode text"
        ) from None
    return text


def _with_parameters(tool: Any) -> Any:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or function.get("parameters") is not None:
        return tool
    return {**tool, "function": {**function, "parameters": dict(NO_PARAMETERS)}}


def _checked_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` as templates read them, as vLLM's ``LLM.chat`` passes OpenAI's messages on:
    text-part contents joined, ``developer`` as ``system``, an assistant's tool calls' JSON
    arguments parsed (templates write them with ``tojson``) and its content, null beside
    them, empty. ``ValueError`` names a malformed message."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', not {type(message).__name__}")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role={role!r}: must be one of {', '.join(CHAT_ROLES)}")
        message = {**message, "role": "system" if role == "developer" else role}
        if message.get("tool_calls") is not None:
            message["tool_calls"] = _checked_tool_calls(message["tool_calls"], role, f"messages[{i}].tool_calls")
        content = message.get("content")
        if isinstance(content, list) and all(
            isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            for part in content
        ):
            content = "\n".join(part["text"] for part in content)
        if content is None and message.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise ValueError(
                f"messages[{i}].content={message.get('content')!r}: must be a string or a list of text parts "
                "(or null in an assistant message with tool_calls)"
            )
        checked.append({**message, "content": content})
    return checked


def _checked_tool_calls(calls: Any, role: str, where: str) -> list[dict[str, Any]]:
    """An assistant's past ``calls`` with each one's arguments an object; empty ones are ``{}``,
    as vLLM reads them."""
    if role != "assistant":
        raise ValueError(f"{where}: tool calls belong to assistant messages, not {role} ones")
    if not isinstance(calls, list):
        raise ValueError(f"{where} must be a list of calls, not {type(calls).__name__}")
    checked = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"{where}[{j}] must be a dict with a 'function' holding its 'name' and 'arguments'")
        arguments = function.get("arguments")
        try:
            if isinstance(arguments, str) or arguments is None:  # as OpenAI sends them; the server parsed its own
                arguments = tool_call_arguments(arguments)
            elif not isinstance(arguments, dict):
                raise ValueError("must be a JSON object")
        except ValueError as e:
            raise ValueError(f"{where}[{j}].function.arguments {e}") from None
        checked.append({**call, "function": {**function, "arguments": arguments}})
    return checked


def tool_call_arguments(text: str | None) -> dict[str, Any]:
    """A past tool call's JSON ``arguments`` as the object templates write with ``tojson``;
    empty ones are none (``{}``), as vLLM reads them: some clients send a call of a function
    without parameters so. ``ValueError`` says why others are not an object."""
    try:
        arguments = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"is not JSON: {e}") from None
    except RecursionError:
        raise ValueError("nests too deep") from None
    if not isinstance(arguments, dict):
        raise ValueError("must be a JSON object")
    return arguments


def eos_token_ids(tokenizer: PreTrainedTokenizerBase | None, *configured: Iterable[int]) -> tuple[int, ...]:
    """The union, in first-seen order, of the tokenizer's EOS and the ``configured`` EOS id lists.

    Models often end a chat turn with a token the tokenizer does not call EOS (Llama 3's
    ``<|eot_id|>``), which only the model or generation config lists.
    """
    ids: list[int] = []
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    for group in configured:
        ids.extend(group)
    return tuple(dict.fromkeys(ids))


def bad_word_token_ids(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> list[list[int]]:
    """The token ids of each of ``words`` as the tokenizer spells it alone and after a space,
    for ``SamplingParams.bad_words``, as vLLM spells them.

    The spaced spelling counts unless it is the bare one after a lone space token (as a
    SentencePiece tokenizer, which starts both with its space, may give). vLLM also asks
    that both have as many tokens, which misses " fox" where "fox" alone is two tokens. A
    SentencePiece tokenizer spells a word after a line break without its space: that
    spelling is not matched, as it is not in vLLM.
    """
    spellings = []
    for word in words:
        bare = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if not bare:  # nothing the model could generate
            continue
        spellings.append(bare)
        if spaced != bare and spaced[1:] != bare:
            spellings.append(spaced)
    return spellings
