"""Fault injection for the retry and resume tests: one environment variable, read by the
driver and handed on to scoring actors and Train workers (they may run on other nodes, where
the driver's environment is not theirs).

``$DIET_RAY_FAULT`` holds ";"-separated parts:
- ``influence:BATCH:FLAGFILE``: a scoring actor exits at its BATCH-th call, once;
- ``influence-always:BATCH``: every scoring actor exits there, restarted ones too;
- ``bilevel[-exit]:STAGE:STEP:FLAGFILE``: Train rank 0 raises (or exits) at that outer step, once;
- ``driver-kill:STAGE:FLAGFILE``: the driver SIGKILLs itself right after committing STAGE, once.
A fault that fires once writes its FLAGFILE first, so the rerun it provokes runs clean.
"""
from __future__ import annotations

import os

FAULT_ENV = "DIET_RAY_FAULT"


def fault_spec() -> str:
    """The driver's fault spec ("" when none), to hand to actors and workers."""
    return os.environ.get(FAULT_ENV, "")
