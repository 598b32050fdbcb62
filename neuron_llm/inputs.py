"""What a request's prompt may be, as vLLM's APIs take it."""

from __future__ import annotations

from typing import Any

Prompt = str | dict[str, Any]
"""A text prompt, ``{"prompt": text}`` (vLLM's TextPrompt) or ``{"prompt_token_ids": [...]}`` (its TokensPrompt)."""


def prompt_input(prompt: Prompt) -> str | list[int]:
    """The text or token ids of ``prompt``; ``ValueError`` for anything else."""
    if isinstance(prompt, dict):
        # Other keys of vLLM's prompts (multi_modal_data, cache_salt...) or a misspelt one
        # would be dropped silently; both keys at once would leave one unused.
        given = sorted(key for key, value in prompt.items() if value is not None)
        if given == ["prompt_token_ids"]:
            token_ids = prompt["prompt_token_ids"]
            if isinstance(token_ids, (str, bytes, dict)) or not hasattr(token_ids, "__iter__"):
                raise ValueError(f"prompt_token_ids must be a list of token ids, not {token_ids!r:.80}")
            return list(token_ids)
        if given == ["prompt"] and isinstance(prompt["prompt"], str):
            return prompt["prompt"]
    elif isinstance(prompt, str):
        return prompt
    raise ValueError(
        f"a prompt must be a string, {{'prompt': str}} or {{'prompt_token_ids': [...]}}, not {prompt!r:.80}"
    )
