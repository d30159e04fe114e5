"""W&B settings: offline by default, online only when the user asks and a key exists."""

from __future__ import annotations

import os


def wandb_mode() -> str:
    """`online` needs WANDB_MODE=online and a key; anything missing falls back to offline."""
    mode = os.environ.get("WANDB_MODE", "offline")
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or os.path.exists(os.path.expanduser("~/.netrc"))):
        return "offline"
    return mode if mode in ("online", "offline", "disabled") else "offline"
