"""`HelpFormatter`: argparse help that shows every option's default, shared by every command line
(generate, serve, quantize, memory) -- they sit in different layers, so it lives in the lowest one."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every default: "(default: X)" after each option's help, unless the help already
    says its default in words (a default that depends on the device, the model, ...) or there is none
    (None: the option is simply not set)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None:
            return text
        return super()._get_help_string(action)
