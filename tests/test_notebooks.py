"""The notebooks execute headless (nbclient, the venv's python3 kernel) and draw their plots.

bring_your_own_trainer.ipynb distills a small synthetic log, exports the memory with ``diet-ray
export --format hard`` and trains a plain scikit-learn model on it (with the exported weights), on
full history and on uniform rows. quickstart.ipynb runs prepare -> run -> evaluate on its tiny default settings into a temporary
run dir (the one parameter changed); results.ipynb then reads that run dir, and a fidelity-bench
shaped dir whose records are computed by ``fidelity_report`` from the quickstart's real
evaluate records. The committed notebooks carry no outputs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

import nbformat
import pytest

from diet_ray.data import fs

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _execute(name: str, params: str, cwd: Path, tail: str = "") -> nbformat.NotebookNode:
    """Run ``name`` with ``params`` executed right after its ``parameters`` cell (papermill's
    rule), and ``tail`` (when given) as one more cell at the end."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(params))
    if tail:
        nb.cells.append(nbformat.v4.new_code_cell(tail))
    NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _images(nb: nbformat.NotebookNode) -> List[int]:
    """Indices of cells that produced a PNG figure."""
    return [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
            and any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]


def test_committed_notebooks_have_no_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"), path


def test_quickstart_then_results_notebooks(tmp_path):
    pytest.importorskip("ipykernel")
    from diet_ray.bench.fidelity_summary import fidelity_metrics, summarize
    from diet_ray.memory.store import last_committed_stage

    run_dir = tmp_path / "run"
    qs = _execute("quickstart.ipynb", f"RUN_DIR = {str(run_dir)!r}", tmp_path)
    assert last_committed_stage(str(run_dir)) == 1
    assert len(_images(qs)) == 1
    recs = fs.read_jsonl(str(run_dir / "results.jsonl"))
    evaluated = [r for r in recs if r["kind"] == "evaluate" and r["candidate"] != "popularity"]
    assert {r["variant"] for r in evaluated} == {"full", "memory"} and len(evaluated) == 6

    res = _execute("results.ipynb", f"RESULTS_DIR = {str(run_dir)!r}", tmp_path)
    assert len(_images(res)) == 2  # per-stage memory/loss, candidates full vs memory

    bench = tmp_path / "bench"
    bench.mkdir()
    full = {r["candidate"]: r for r in evaluated if r["variant"] == "full"}
    mem = {r["candidate"]: r for r in evaluated if r["variant"] == "memory"}
    lines = [{"kind": "fidelity", "variant": "diet", "budget": 0.01, "seed_index": 0, "stage": 0, "test_stage": 1,
              "train_rows": mem[next(iter(mem))]["train_rows"], **fidelity_metrics(full, mem)}]
    (bench / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (bench / "summary.json").write_text(json.dumps(summarize(lines, {"budget_ratio": 0.01})))
    fid = _execute("results.ipynb", f"RESULTS_DIR = {str(bench)!r}", tmp_path)
    assert len(_images(fid)) == 1  # Kendall per variant, cost vs fidelity


def test_bring_your_own_trainer_notebook(tmp_path):
    """The memory exported as hard rows trains a scikit-learn model outside diet_ray; its test
    AUC is reported beside the same model's on full history and on as many uniform rows."""
    pytest.importorskip("ipykernel")
    import pandas as pd

    run_dir = tmp_path / "run"
    nb = _execute("bring_your_own_trainer.ipynb", f"RUN_DIR = {str(run_dir)!r}\nLOG = ''\nCONFIG = None", tmp_path,
                  tail="import json\nprint(json.dumps(results.to_dict('records')))")
    exported = pd.read_parquet(run_dir / "export" / "memory-stage2-hard.parquet")
    assert {"label", "label_prob", "weight", "user", "item"} <= set(exported.columns) and len(exported) > 0
    rows = json.loads(nb.cells[-1].outputs[0]["text"])
    assert [r["training set"] for r in rows] == ["full history", "DIET memory (soft labels, weights)", "uniform rows"]
    assert rows[1]["rows"] == rows[2]["rows"] == len(exported) < rows[0]["rows"]
    assert all(0.0 < r["test AUC"] < 1.0 for r in rows)
