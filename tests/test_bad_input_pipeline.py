"""Bad input that gets past ``prepare`` and reaches ``run`` / ``evaluate`` (issue 7): a stage with
zero rows, and ids at evaluation time that training never saw (mapped to the OOV id).

The cases caught by ``prepare`` itself (missing/empty file, delimiter, undeclared column, label
rule, bad timestamp/numeric, duplicates, out-of-order time, corrupted Parquet, truncated line,
rejects accounting) live in test_bad_input.py and test_prepare.py; config typos and incompatible
resumes in test_config.py and test_run.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List

import numpy as np
import pytest

from diet_ray.config import load_config
from diet_ray.data import fs
from diet_ray.data.stages import StageStore
from diet_ray.distill.pipeline import run
from diet_ray.layout import RESULTS_FILE
from diet_ray.evaluate.runner import evaluate
from diet_ray.memory.store import committed_stages, load_stage_memory

DAY = 86_400
BASE = 1_700_000_000 - 1_700_000_000 % DAY  # a UTC midnight
CANDIDATES = "[{model: lr, lr: 0.05}, {model: fm, embed_dim: 4, lr: 0.01}]"
FAST = ["evaluate.parallel=false", "evaluate.train.epochs=1", "evaluate.train.batch_size=128", f"evaluate.candidates={CANDIDATES}"]


def write_csv(path: Path, rows: List[str]) -> Path:
    path.write_text("user,item,ts,click\n" + "\n".join(rows) + "\n")
    return path


def day_rows(day: int, n: int, rng: np.random.Generator, items: range) -> List[str]:
    out = []
    for i in range(n):
        item = int(rng.choice(items))
        click = int(rng.random() < (0.8 if item % 3 == 0 else 0.15))
        out.append(f"u{rng.integers(0, 40)},i{item},{BASE + day * DAY + i * 7},{click}")
    return out


def data_overrides(src: Path, run_dir: Path, **stages) -> List[str]:
    by = stages or {"by": "time", "every": "1d"}
    return [
        f"data.source={src}", "data.label=click == 1", "data.timestamp=ts",
        "data.categorical=[user, item]", "data.numeric=[]", f"run.dir={run_dir}",
        f"data.stages={json.dumps(by)}",
    ]


@pytest.mark.ray
def test_a_stage_with_zero_rows_flows_through_run_and_evaluate(ray_local, tmp_path, caplog):
    rng = np.random.default_rng(0)
    src = write_csv(tmp_path / "log.csv", day_rows(0, 600, rng, range(30)) + day_rows(2, 600, rng, range(30)))
    cfg = load_config(None, [
        *data_overrides(src, tmp_path / "run"),
        # No Train job and no actor pool: the empty stage's path through the driver is what matters.
        "memory.init=random", "distill.outer_steps=0", "memory.ratio=0.05",
        "expert.model={model: dnn, embed_dim: 4, hidden: [8]}", *FAST,
    ])
    out = run(cfg)
    run_dir = str(tmp_path / "run")
    assert out["new_stages"] == [0, 1, 2] and committed_stages(run_dir) == [0, 1, 2]
    per = {m["stage"]: m for m in out["per_stage"]}
    assert per[1]["rows"] == 0 and per[1]["rows_seen"] == 600
    assert per[1]["grown"] == 0 and per[1]["replaced"] == 0 and per[1]["slots"] == per[0]["slots"] == 30
    before, empty = load_stage_memory(run_dir, 0), load_stage_memory(run_dir, 1)
    assert np.array_equal(before.slot_id, empty.slot_id) and np.array_equal(before.ids.numpy(), empty.ids.numpy())
    assert per[2]["rows_seen"] == 1200 and per[2]["slots"] == 60
    assert [r["stage"] for r in fs.read_jsonl(fs.join(run_dir, RESULTS_FILE)) if r["kind"] == "stage"] == [0, 1, 2]

    # Stage 1 (empty) trains on stage 0's rows and tests on stage 2; stage 0 would test on the
    # empty stage: skipped with a warning, not a NaN AUC.
    recs = evaluate(load_config(None, [*data_overrides(src, tmp_path / "run"), "memory.init=random", "distill.outer_steps=0",
                                       "memory.ratio=0.05", "expert.model={model: dnn, embed_dim: 4, hidden: [8]}", *FAST,
                                       "evaluate.stages=[0, 1]", "evaluate.variants=[full, memory]"]))
    assert "stage 0: skipped, its test stage 1 has no rows" in caplog.text
    assert {(r["stage"], r["test_stage"]) for r in recs} == {(1, 2)}
    assert all(r["test_rows"] == 600 and math.isfinite(r["auc"]) for r in recs)
    assert {r["train_rows"] for r in recs if r["variant"] == "full"} == {600}


def test_unseen_ids_at_evaluation_use_the_oov_id(tmp_path):
    """Stage 2 brings items never seen in stages 0-1. Two streams differ only in which new item
    each of those rows has (so their encoded ids differ row by row): after the OOV mapping the
    test batches are identical, so every candidate's AUC and LogLoss must be identical too."""
    records, raw_ids = [], []
    # Ten new items in both (equal vocabulary sizes, so equal model initialisation): in turn in
    # "a", at random in "b".
    shuffled = np.random.default_rng(9).integers(0, 10, 500)
    for variant, new_item in (("a", lambda i: (i // 2) % 10), ("b", lambda i: shuffled[i])):
        rng = np.random.default_rng(1)
        rows = day_rows(0, 500, rng, range(30)) + day_rows(1, 500, rng, range(30))
        last = day_rows(2, 500, rng, range(30))
        for i in range(0, len(last), 2):  # every other test row gets a new item
            user, _, ts, click = last[i].split(",")
            last[i] = f"{user},new{new_item(i)},{ts},{click}"
        src = write_csv(tmp_path / f"{variant}.csv", rows + last)
        cfg = load_config(None, [*data_overrides(src, tmp_path / f"run_{variant}"), *FAST, "evaluate.stages=[1]", "seed=3"])
        records.append({r["candidate"]: r for r in evaluate(cfg)})

        store = StageStore(str(tmp_path / f"run_{variant}"))
        item = store.fmap.cat_names.index("item")
        raw, mapped = store.read_stage(2).cat[:, item], store.read_stage(2).with_unknown_as_oov(store.fmap, 1).cat[:, item]
        known = store.fmap.known_limits(1)[item]
        assert (raw[::2] >= known).all() and (mapped[::2] == store.fmap.oov_ids()[item]).all()
        assert np.array_equal(mapped[1::2], raw[1::2])  # seen ids are kept
        raw_ids.append(raw)

    assert not np.array_equal(raw_ids[0], raw_ids[1])  # the streams really differ before mapping
    a, b = records
    assert set(a) == set(b) and len(a) == 3  # popularity + 2 candidates
    for name in a:
        assert a[name]["auc"] == b[name]["auc"] and a[name]["logloss"] == b[name]["logloss"], name


def test_user_errors_show_a_traceback_only_with_verbose(tmp_path, capsys):
    from diet_ray.cli import main
    from diet_ray.errors import DataError

    args = ["prepare", f"data.source={tmp_path / 'missing.csv'}", f"run.dir={tmp_path / 'run'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "missing.csv" in err
    with pytest.raises(DataError, match="missing.csv"):  # --verbose: the exception propagates (traceback)
        main([*args, "--verbose"])
