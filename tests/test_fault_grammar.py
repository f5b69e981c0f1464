"""The fault grammar of ``$DIET_RAY_FAULT`` (diet_ray.faults): parsing, and each hook firing once."""
from __future__ import annotations

import pytest

from diet_ray import faults as F


def test_every_kind_parses_and_a_bad_part_names_itself():
    spec = "influence:3:/f1;influence-always:2;bilevel:1:11:/f2;bilevel-exit:0:4:/f3;driver-kill:5:/f4"
    assert F.parse(spec) == [
        F.Fault("influence", at=3, flag="/f1"), F.Fault("influence-always", at=2),
        F.Fault("bilevel", stage=1, at=11, flag="/f2"), F.Fault("bilevel-exit", stage=0, at=4, flag="/f3"),
        F.Fault("driver-kill", stage=5, flag="/f4"),
    ]
    assert F.parse("") == []
    for bad in ("bilevel:1:/f", "influence:x:/f", "typo:1"):
        with pytest.raises(ValueError, match=bad.replace("/", ".")):
            F.parse(bad)


def test_the_bilevel_hook_fires_once_at_its_step_on_rank_0(tmp_path):
    flag = tmp_path / "flag"
    spec = f"bilevel:2:7:{flag}"
    F.fail_bilevel_step(spec, stage=2, step=6, rank=0)  # not its step
    F.fail_bilevel_step(spec, stage=2, step=7, rank=1)  # not rank 0
    assert not flag.exists()
    with pytest.raises(RuntimeError, match="stage 2 outer step 7"):
        F.fail_bilevel_step(spec, stage=2, step=7, rank=0)
    assert flag.read_text() == "failed once\n"
    F.fail_bilevel_step(spec, stage=2, step=7, rank=0)  # the flag file: the rerun runs clean
