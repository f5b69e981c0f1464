"""Seed derivation: one run seed, every other seed derived from it."""
from __future__ import annotations

import hashlib
import json
from typing import Any


def derive_seed(seed: int, *parts: Any) -> int:
    """One seed for everything: stage, actor and worker seeds derive from it deterministically."""
    h = hashlib.sha256(json.dumps([seed, *parts], default=str).encode()).digest()
    return int.from_bytes(h[:4], "little")
