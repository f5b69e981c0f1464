"""Fault injection for the retry and resume tests: one environment variable, read by the
driver and handed on to scoring actors and Train workers (they may run on other nodes, where
the driver's environment is not theirs). This module owns the grammar; each hook is one call.

``$DIET_RAY_FAULT`` holds ";"-separated parts:
- ``influence:BATCH:FLAGFILE``: a scoring actor exits at its BATCH-th call, once;
- ``influence-always:BATCH``: every scoring actor exits there, restarted ones too;
- ``bilevel[-exit]:STAGE:STEP:FLAGFILE``: Train rank 0 raises (or exits) at that outer step, once;
- ``driver-kill:STAGE:FLAGFILE``: the driver SIGKILLs itself right after committing STAGE, once.
A fault that fires once writes its FLAGFILE first, so the rerun it provokes runs clean.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import List, Optional

FAULT_ENV = "DIET_RAY_FAULT"
KINDS = ("influence", "influence-always", "bilevel", "bilevel-exit", "driver-kill")


@dataclass(frozen=True)
class Fault:
    kind: str
    stage: Optional[int] = None  # bilevel*, driver-kill
    at: Optional[int] = None  # the scoring call (influence*) or the outer step (bilevel*)
    flag: Optional[str] = None  # None: fires every time (influence-always)

    def due(self) -> bool:
        return self.flag is None or not os.path.exists(self.flag)

    def mark(self, what: str) -> None:
        if self.flag is not None:
            with open(self.flag, "w") as f:
                f.write(what + "\n")


def fault_spec() -> str:
    """The driver's fault spec ("" when none), to hand to actors and workers."""
    return os.environ.get(FAULT_ENV, "")


def parse(spec: str) -> List[Fault]:
    """The faults of a spec; a malformed part raises ValueError naming it."""
    out = []
    for part in filter(None, spec.split(";")):
        kind, _, rest = part.partition(":")
        try:
            if kind == "influence":
                at, flag = rest.split(":", 1)
                out.append(Fault(kind, at=int(at), flag=flag))
            elif kind == "influence-always":
                out.append(Fault(kind, at=int(rest)))
            elif kind in ("bilevel", "bilevel-exit"):
                stage, step, flag = rest.split(":", 2)
                out.append(Fault(kind, stage=int(stage), at=int(step), flag=flag))
            elif kind == "driver-kill":
                stage, flag = rest.split(":", 1)
                out.append(Fault(kind, stage=int(stage), flag=flag))
            else:
                raise ValueError(f"kind must be one of {KINDS}")
        except ValueError as e:
            raise ValueError(f"${FAULT_ENV}: cannot read {part!r} ({e})") from None
    return out


def kill_driver_after_commit(stage: int) -> None:
    """Driver hook: SIGKILL right after ``stage`` is committed, before its results line."""
    for f in parse(fault_spec()):
        if f.kind == "driver-kill" and f.stage == stage and f.due():
            f.mark(f"driver {os.getpid()} killed after committing stage {stage}")
            os.kill(os.getpid(), signal.SIGKILL)


def fail_bilevel_step(spec: str, stage: int, step: int, rank: int) -> None:
    """Train worker hook: rank 0 raises (``bilevel``) or exits (``bilevel-exit``) at that outer step, once."""
    if rank != 0:
        return
    for f in parse(spec):
        if f.kind in ("bilevel", "bilevel-exit") and f.stage == stage and f.at == step and f.due():
            f.mark("failed once")
            if f.kind == "bilevel-exit":
                os._exit(1)
            raise RuntimeError(f"injected fault at stage {stage} outer step {step} ({FAULT_ENV})")


def kill_scorer(spec: str, call: int) -> None:
    """Scoring actor hook: the process exits at its ``call``-th batch (once, or in every actor)."""
    for f in parse(spec):
        if f.kind in ("influence", "influence-always") and f.at == call and f.due():
            f.mark(f"scorer actor {os.getpid()} exited at batch {call}")
            os._exit(1)
