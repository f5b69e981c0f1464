"""``diet-ray <verb> -c config.yaml key=value ...``.

User errors (``DietRayError``) print one line and exit 2; ``--verbose`` shows tracebacks,
DEBUG logs and Ray Data progress bars.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from typing import List, Optional

from diet_ray.errors import DietRayError

log = logging.getLogger("diet_ray")

OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")
# Loggers of the steps inside a stage (expert pass, influence actors): shown with --verbose only.
STEP_LOGGERS = ("diet_ray.distill.expert", "diet_ray.influence.ray_scoring")


def _common(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("-c", "--config", default=None, help="YAML config (defaults: embedded synthetic stream)")
        p.set_defaults(overrides=[])
        p.epilog = "Any KEY=VALUE argument is a config override, e.g. seed=3 data.stages.count=8."
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks, debug logs, Ray progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diet-ray", description="Continual dataset distillation for CTR models on Ray.")
    sub = p.add_subparsers(dest="verb", required=True)

    s = sub.add_parser("prepare", help="read raw logs, label, split into stages, encode")
    _common(s)
    s = sub.add_parser("quickstart", help="run on the embedded synthetic stream, then a verdict: does the memory rank candidates like full history?")
    _common(s)
    s = sub.add_parser("run", help="distill every stage end to end (resumes after the last committed stage)")
    _common(s)
    s = sub.add_parser("evaluate", help="train candidates on history, test on the next stage")
    _common(s)
    s = sub.add_parser("influence", help="score one stage's rows and write them as Parquet")
    _common(s)
    s.add_argument("--stage", type=int, required=True)
    s = sub.add_parser("synth", help="write the synthetic drifting stream as Parquet")
    _common(s)
    s.add_argument("--out", required=True)
    s.add_argument("--rows", type=int, default=None)
    s = sub.add_parser("export", help="export a stage's memory (soft or hard rows)")
    s.add_argument("run_dir")
    s.add_argument("--stage", type=int, required=True)
    s.add_argument("--format", choices=["soft", "hard"], default="hard")
    s.add_argument("--out", required=True)
    _common(s, config=False)
    s = sub.add_parser("bench", help="benchmarks: JSON + a printed table")
    s.add_argument("what", choices=["influence", "prepare", "bilevel", "expert", "fidelity", "soak"])
    s.add_argument("--out", required=True)
    s.add_argument("--rows", type=int, default=None)
    _common(s)
    s = sub.add_parser("report", help="(re)draw plots for a run or bench directory")
    s.add_argument("dir")
    _common(s, config=False)
    return p


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
        stream=sys.stderr,
    )
    for noisy in ("ray", "urllib3", "botocore", "s3fs", "aiobotocore", "fsspec", "matplotlib", "filelock"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
    # Explicit, so the console does not depend on a root logger configured elsewhere.
    logging.getLogger("diet_ray").setLevel(logging.DEBUG if verbose else logging.INFO)
    # Per-step details of a stage; the stage's own summary line carries their timings.
    for step in STEP_LOGGERS:
        logging.getLogger(step).setLevel(logging.DEBUG if verbose else logging.WARNING)


def embedded_config(name: str) -> str:
    """Path of a config shipped inside the package (works from a wheel or a checkout)."""
    from importlib.resources import files

    return str(files("diet_ray") / "configs" / f"{name}.yaml")


def dispatch(args: argparse.Namespace) -> int:
    from diet_ray.config import load_config

    verb = args.verb
    path = getattr(args, "config", None)
    if path is None and verb == "quickstart":
        path = embedded_config("quickstart")
    cfg = load_config(path, args.overrides) if hasattr(args, "overrides") else None
    if cfg is not None:
        from diet_ray.data import fs

        # Before any I/O: some verbs (bench) touch their output before opening a run dir.
        fs.configure(cfg.io.endpoint_url, cfg.io.region)
    if verb == "prepare":
        from diet_ray.run_dir import prepare

        stats = prepare(cfg)
        print(json.dumps({k: stats[k] for k in ("rows_in", "rows_accepted", "rows_rejected")}))
    elif verb == "synth":
        from diet_ray.data.synthetic import write_synthetic

        write_synthetic(cfg.data.source, args.out, rows=args.rows, seed=cfg.seed)
    elif verb == "evaluate":
        from diet_ray.evaluate.runner import evaluate

        evaluate(cfg, verbose=args.verbose)
    elif verb == "influence":
        from diet_ray.distill.stage_influence import influence_stage

        influence_stage(cfg, args.stage, verbose=args.verbose)
    elif verb == "quickstart":
        from diet_ray.quickstart import quickstart

        quickstart(cfg, verbose=args.verbose)
    elif verb == "run":
        from diet_ray.distill.pipeline import run

        run(cfg, verbose=args.verbose)
    elif verb == "export":
        from diet_ray.memory.export import export

        export(args.run_dir, args.stage, args.format, args.out)
    elif verb == "bench":
        from diet_ray.bench import run_bench

        run_bench(args.what, cfg, args.out, rows=args.rows, verbose=args.verbose)
    elif verb == "report":
        from diet_ray.bench.fidelity_report import is_fidelity_dir, redraw
        from diet_ray.evaluate.report import report

        if is_fidelity_dir(args.dir):  # a fidelity bench dir: its table and plots
            redraw(args.dir)
        else:
            report(args.dir)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # key=value overrides may appear anywhere (argparse cannot intermix them with positionals).
    overrides = [a for a in argv if OVERRIDE.match(a)]
    args = build_parser().parse_args([a for a in argv if not OVERRIDE.match(a)])
    if hasattr(args, "overrides"):
        args.overrides = overrides
    elif overrides:
        build_parser().error(f"{args.verb} takes no key=value overrides: {' '.join(overrides)}")
    setup_logging(args.verbose)
    try:
        return dispatch(args)
    except DietRayError as e:
        if args.verbose:
            raise
        print(f"diet-ray {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diet-ray {args.verb}: interrupted; committed stages are kept, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
