"""The command line's help formatter: each option's default, where its help does not give it."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help names its default already,
    or the default is None or False (an option that is off, or whose help says what it means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS or "default" in text:
            return text
        return f"{text} (default: {default})" if action.option_strings else text
