"""``diet-ray bench WHAT``: each benchmark writes ``OUT/WHAT.json`` and prints a table."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from diet_ray.config import Config
from diet_ray.data import fs
from diet_ray.errors import ConfigError


def run_bench(what: str, cfg: Config, out: str, rows: Optional[int] = None, verbose: bool = False) -> Dict[str, Any]:
    if what == "prepare":
        from diet_ray.bench.prepare import bench_prepare as fn
    elif what == "influence":
        from diet_ray.bench.influence import bench_influence as fn
    elif what == "bilevel":
        from diet_ray.bench.bilevel import bench_bilevel as fn
    elif what == "fidelity":
        from diet_ray.bench.fidelity_bench import bench_fidelity as fn
    elif what == "expert":
        from diet_ray.bench.expert import bench_expert as fn
    elif what == "soak":
        from diet_ray.bench.soak import bench_soak as fn
    else:
        raise ConfigError(f"unknown benchmark '{what}'")
    result = fn(cfg, out, rows=rows, verbose=verbose)
    fs.makedirs(out)
    fs.write_json_atomic(fs.join(out, f"{what}.json"), result)
    print_table(result)
    return result


def print_table(result: Dict[str, Any]) -> None:
    """Scalars as a two-column table; lists of dicts as their own tables."""
    scalars = [(k, v) for k, v in result.items() if not isinstance(v, (list, dict))]
    w = max((len(k) for k, _ in scalars), default=10)
    for k, v in scalars:
        print(f"{k:<{w}}  {_fmt(v)}")
    for k, v in result.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            print(f"\n{k}:")
            _print_rows(v)
        elif isinstance(v, dict):
            print(f"\n{k}:")
            for kk, vv in v.items():
                print(f"  {kk:<{w}}  {_fmt(vv)}")


def _print_rows(rows: List[Dict[str, Any]]) -> None:
    cols = list(rows[0])
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  " + "  ".join(c.rjust(x) for c, x in zip(cols, widths)))
    for r in rows:
        print("  " + "  ".join(_fmt(r.get(c)).rjust(x) for c, x in zip(cols, widths)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)
