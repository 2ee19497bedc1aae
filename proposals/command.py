"""`sppnet proposals`: placeholder until the proposals issue lands its command here."""

from __future__ import annotations

import argparse
from typing import Callable


def register(sub: argparse._SubParsersAction, add_workdir: Callable, add_json: Callable) -> None:
    """Add the `proposals` subcommand to the `sppnet` parser (nothing yet)."""
