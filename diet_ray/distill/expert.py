"""The stream expert (DESIGN §3): the model a platform trains continually, one pass per stage in
time order, warm-started from the previous stage, checkpointed K times per stage.

Reference set. The newest ``holdout_frac`` of stage t is its reference set (G_ref for influence,
real-data terms for distillation). The expert does NOT train on it during stage t, so G_ref(theta_c)
measures what generalises forward; those rows open stage t+1's pass instead. The expert's stream
is therefore its input delayed by one holdout: every row is trained on exactly once, in time
order, and checkpoint 0 of stage t+1 equals the last checkpoint of stage t (the warm start).

On disk: ``run_dir/expert/stage=NNNN/{ckpt-KK.pt, optim-KK.pt, optim.pt, ref.parquet, meta.json}``
(the bi-level student's stream model, where it is not the expert, the same under ``expert/student/``)
(``optim-KK.pt``: the optimiser's state at checkpoint KK, which the bi-level student continues
from; runs written before it existed load with ``optim=None``); every
file is written atomically and ``meta.json`` is written last, so a stage without it is absent.
Checkpoints are ``torch.save``d state dicts and are read back with ``weights_only=True``.

Optimiser (``expert.optimizer``): ``lazy_adam`` (default), Adam with row-sparse updates of the
embedding table (diet_ray/models/optim.py), whose per-step cost does not grow with the
vocabulary; ``adam``, dense ``torch.optim.Adam`` (stages saved before the choice existed).
``meta.json`` records it, and a stage saved with the other one is refused.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from diet_ray.config import Config, ExpertConfig, derive_seed
from diet_ray.data import fs
from diet_ray.data.feature_map import FeatureMap
from diet_ray.data.stages import EncodedRows, StageStore
from diet_ray.errors import ConfigError, RunStateError
from diet_ray.layout import experts_root, stage_name, student_root
from diet_ray.models import MODELS, Batch, CTRModel, build_model
from diet_ray.models.optim import make_optimizer

log = logging.getLogger(__name__)


@dataclass
class ExpertCheckpoint:
    index: int  # 0..K; 0 = stage start (the warm-start state)
    lr: float  # learning rate of the segment that ends here; 0 for index 0
    state: Dict[str, torch.Tensor]  # model.state_dict(), CPU
    optim: Optional[dict] = None  # the optimiser's state_dict() at this checkpoint (moments), CPU


@dataclass
class ExpertStage:
    stage: int
    checkpoints: List[ExpertCheckpoint]  # K + 1
    ref_rows: EncodedRows  # newest holdout_frac of the stage, not trained on in this stage
    train_rows: int  # rows trained on in this stage's pass (previous holdout included)
    wall_s: float
    sample_steps: int  # rows x passes: the expert's share of the distillation cost


def split_reference(rows: EncodedRows, holdout_frac: float) -> tuple[EncodedRows, EncodedRows]:
    """Time-ordered (train, reference): the reference is the newest ``holdout_frac`` (>= 1 row
    when the stage has at least 2 rows)."""
    order = np.argsort(rows.row_id, kind="stable")
    if np.any(order != np.arange(len(rows))):
        rows = rows.take(order)
    n = len(rows)
    n_ref = 0 if n < 2 else min(n - 1, max(1, int(round(holdout_frac * n))))
    return rows.slice(0, n - n_ref), rows.slice(n - n_ref, n)


def _save_torch(uri: str, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    fs.write_bytes_atomic(uri, buf.getvalue())


def _without_first_moment(optim: dict) -> dict:
    """An Adam ``state_dict()`` without ``exp_avg`` (the rest shared, not copied)."""
    state = {k: {n: t for n, t in st.items() if n != "exp_avg"} for k, st in optim.get("state", {}).items()}
    return {**optim, "state": state}


def _load_torch(uri: str):
    try:
        return torch.load(io.BytesIO(fs.read_bytes(uri)), map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunStateError(f"{uri}: unreadable expert checkpoint ({e}). Delete {fs.join(uri, '..')} to retrain that stage.")


def expert_step(model: CTRModel, opt: torch.optim.Optimizer, batch: Batch) -> None:
    """One optimiser step of the expert on one batch (the pass's unit of work)."""
    opt.zero_grad(set_to_none=True)
    F.binary_cross_entropy_with_logits(model.logits(batch), batch.label).backward()
    opt.step()


def student_model(cfg: Config) -> Dict[str, Any]:
    """The bi-level student's architecture (``distill.student``): ``expert`` or a registry model
    name; a name the expert already is gives the expert's own model."""
    name = cfg.distill.student
    if name == "expert" or name == cfg.expert.model.get("model"):
        return dict(cfg.expert.model)
    if name not in MODELS:
        raise ConfigError(f"distill.student={name!r} is not one of {['expert', *MODELS]}")
    return {"model": name}


def rows_to_table(rows: EncodedRows, fmap: FeatureMap) -> pa.Table:
    cols = {"_row_id": rows.row_id, "_ts": rows.ts, "_label": rows.label}
    cols.update({n: rows.cat[:, i] for i, n in enumerate(fmap.cat_names)})
    cols.update({n: rows.num[:, i] for i, n in enumerate(fmap.num_names)})
    return pa.table(cols)


class StreamExpert:
    def __init__(self, fmap: FeatureMap, cfg: ExpertConfig, seed: int, run_dir: str, root: Optional[str] = None):
        self.fmap, self.cfg, self.seed, self.run_dir = fmap, cfg, seed, run_dir
        self.root = root or experts_root(run_dir)  # holds its stage=NNNN dirs
        self.model_key = "expert.model" if root is None else "distill.student"  # which key sets the model (errors)
        self.spec = fmap.input_spec()
        self.K = max(1, int(cfg.checkpoints_per_stage))

    @classmethod
    def from_config(cls, cfg: Config, fmap: FeatureMap, run_dir: Optional[str] = None) -> "StreamExpert":
        """The run's expert: its seed derives from ``cfg.seed`` so every verb reuses the same checkpoints."""
        return cls(fmap, cfg.expert, derive_seed(cfg.seed, "expert"), run_dir or cfg.run.dir)

    @classmethod
    def student_of(cls, cfg: Config, expert: "StreamExpert") -> "StreamExpert":
        """The stream model whose trajectory the bi-level step matches (``distill.student``): the
        expert itself when it is of that architecture, else a model of it trained on the same
        stream beside the expert, under ``expert/student/`` (docs/method.md)."""
        model = student_model(cfg)
        if model == dict(cfg.expert.model):
            return expert
        return cls(expert.fmap, dataclasses.replace(cfg.expert, model=model), derive_seed(cfg.seed, "student"),
                   expert.run_dir, root=student_root(expert.run_dir))

    def stage_dir(self, stage: int) -> str:
        return fs.join(self.root, stage_name(stage))

    def build_model(self) -> CTRModel:
        return build_model(dict(self.cfg.model), self.spec, seed=derive_seed(self.seed, "init"))

    def teacher(self, es: ExpertStage, bound: float) -> Callable[[Batch], torch.Tensor]:
        """batch -> the expert's logits at the stage's last checkpoint, clipped to +-``bound``:
        soft labels that carry what training on the whole stream taught, which one 0/1 label
        per row cannot (docs/method.md). The model is built once, however often it is asked."""
        model = self.build_model()
        model.load_state_dict(es.checkpoints[-1].state)
        model.eval()

        def label(batch: Batch) -> torch.Tensor:
            with torch.no_grad():
                out = [model.logits(batch.select(torch.arange(i, min(i + 65536, len(batch))))) for i in range(0, len(batch), 65536)]
            z = torch.cat(out) if out else torch.zeros(0)
            return z.float().clamp(-bound, bound)

        return label

    def build_optimizer(self, model: CTRModel) -> torch.optim.Optimizer:
        """``expert.optimizer`` over ``model`` (lazy_adam also gives the model's table sparse gradients)."""
        return make_optimizer(model, self.cfg.optimizer, self.cfg.lr)

    # -- training -------------------------------------------------------------------------

    def train_stage(self, stage: int, rows: EncodedRows) -> ExpertStage:
        """One pass over (previous holdout + this stage minus its holdout), K checkpoints, saved."""
        t0 = time.perf_counter()
        train, ref = split_reference(rows, self.cfg.holdout_frac)
        model = self.build_model()
        opt = self.build_optimizer(model)
        if stage > 0:
            prev_dir = self.stage_dir(stage - 1)
            meta = self._meta(stage - 1)
            if meta is None:
                raise RunStateError(
                    f"{prev_dir}: the expert for stage {stage - 1} is missing; train stages in order (0..{stage})."
                )
            # Only the last state, the optimiser and the holdout rows carry over.
            last = int(meta["checkpoints"][-1]["index"])
            model.load_state_dict(_load_torch(fs.join(prev_dir, f"ckpt-{last:02d}.pt")))
            optim_uri = fs.join(prev_dir, "optim.pt")
            if fs.exists(optim_uri):
                opt.load_state_dict(_load_torch(optim_uri))
            prev_ref = EncodedRows.from_table(fs.read_parquet(fs.join(prev_dir, "ref.parquet")), self.fmap)
            train = EncodedRows.concat([prev_ref, train])
        checkpoints = [ExpertCheckpoint(0, 0.0, self._state(model), self._optim_state(opt))]
        n, bs = len(train), max(1, int(self.cfg.batch_size))
        n_batches = -(-n // bs)
        # Segment c ends after batch round(c * n_batches / K): K checkpoints spread over the pass.
        ends = [round(c * n_batches / self.K) for c in range(1, self.K + 1)]
        b = 0
        model.train()
        for c, end in enumerate(ends, start=1):
            while b < end:
                expert_step(model, opt, train.batch(np.arange(b * bs, min((b + 1) * bs, n))))
                b += 1
            checkpoints.append(ExpertCheckpoint(c, float(self.cfg.lr), self._state(model), self._optim_state(opt)))
        result = ExpertStage(stage, checkpoints, ref, n, time.perf_counter() - t0, n)
        self._save(result, opt)
        log.info("expert stage %d: %d rows, %d checkpoints, %.1fs", stage, n, len(checkpoints), result.wall_s)
        return result

    def train_through(self, store: StageStore, stage: int) -> ExpertStage:
        """Load or train stages 0..``stage`` in order (resume reuses saved stages)."""
        last = None
        for t in range(stage + 1):
            last = self.load_stage(t)
            if last is None:
                last = self.train_stage(t, store.read_stage(t))
        assert last is not None
        return last

    @staticmethod
    def _state(model: CTRModel) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    @staticmethod
    def _optim_state(opt: torch.optim.Optimizer) -> dict:
        # state_dict() shares the live moment tensors, which later steps update in place.
        return copy.deepcopy(opt.state_dict())

    # -- persistence ----------------------------------------------------------------------

    def _save(self, st: ExpertStage, opt: torch.optim.Optimizer) -> None:
        d = self.stage_dir(st.stage)
        for c in st.checkpoints:
            _save_torch(fs.join(d, f"ckpt-{c.index:02d}.pt"), c.state)
            if c.optim is not None:
                _save_torch(fs.join(d, f"optim-{c.index:02d}.pt"), c.optim)
        _save_torch(fs.join(d, "optim.pt"), opt.state_dict())
        fs.write_parquet_atomic(rows_to_table(st.ref_rows, self.fmap), fs.join(d, "ref.parquet"))
        meta = {
            "stage": st.stage,
            "checkpoints": [{"index": c.index, "lr": c.lr} for c in st.checkpoints],
            "model": dict(self.cfg.model),
            "optimizer": self.cfg.optimizer,
            "ref_rows": len(st.ref_rows),
            "train_rows": st.train_rows,
            "wall_s": st.wall_s,
            "sample_steps": st.sample_steps,
        }
        fs.write_json_atomic(fs.join(d, "meta.json"), meta)  # last: marks the stage complete

    def _meta(self, stage: int) -> Optional[Dict[str, Any]]:
        """The stage's meta.json (written last: its presence means the stage is complete), or
        None; one saved for another model, optimiser or checkpoint count is refused (stages
        saved before the optimiser was recorded used dense Adam)."""
        meta_uri = fs.join(self.stage_dir(stage), "meta.json")
        if not fs.exists(meta_uri):
            return None
        meta = fs.read_json(meta_uri)
        if meta.get("model") != dict(self.cfg.model) or len(meta["checkpoints"]) != self.K + 1:
            raise RunStateError(
                f"{meta_uri}: saved for model {meta.get('model')} with {len(meta['checkpoints']) - 1} checkpoints, "
                f"but {self.model_key}={dict(self.cfg.model)}, expert.checkpoints_per_stage={self.K}. Use a new run.dir."
            )
        saved = meta.get("optimizer", "adam")
        if saved != self.cfg.optimizer:
            raise RunStateError(
                f"{meta_uri}: saved with expert.optimizer={saved}, but expert.optimizer={self.cfg.optimizer}. "
                "Use a new run.dir, or set it back to resume."
            )
        return meta

    def has_stage(self, stage: int) -> bool:
        """Whether the stage's expert is complete on disk, without loading its tensors (a resume
        at scale would otherwise read every stage's K+1 states and optimiser states)."""
        meta = self._meta(stage)
        if meta is None:
            return False
        d = self.stage_dir(stage)
        files = [f"ckpt-{int(c['index']):02d}.pt" for c in meta["checkpoints"]] + ["ref.parquet"]
        return all(fs.exists(fs.join(d, f)) for f in files)

    def path_to(self, stage: int, segments: int, first_moment: bool = True) -> List[ExpertCheckpoint]:
        """The expert's states on its path from its initialisation to the start of ``stage``,
        with their optimiser states: θ_0 of stage 0, then the last checkpoint of earlier stages,
        up to but not including the start of ``stage`` itself (its first checkpoint, which the
        caller holds). At most ``segments`` segments up to that start: every earlier stage's end
        while ``stage <= segments``, else the stage ends nearest to even spacing.
        ``first_moment=False`` drops Adam's ``exp_avg`` as each state loads: a student that starts
        its own momentum never reads it, and K path states of it are a third of what a job holds
        for the path (docs/performance.md, the current default's soak)."""
        if stage <= 0:
            return []
        ends = range(stage + 1) if stage <= segments else \
            sorted({int(round(i * stage / segments)) for i in range(segments + 1)})
        path: List[ExpertCheckpoint] = []
        for b in list(ends)[:-1]:  # boundary b: the start of stage b = the end of stage b - 1
            path.append(self._path_checkpoint(max(0, b - 1), 0 if b == 0 else self.K, stage, first_moment))
        return path

    def even_path(self, stage: int, current: List[ExpertCheckpoint], segments: int,
                  first_moment: bool = True) -> List[ExpertCheckpoint]:
        """The expert's whole path from its initialisation to the end of ``stage`` in at most
        ``segments`` segments, their ends at even spacing over the saved checkpoints (K a stage;
        the stage's own come from ``current``, its K+1 checkpoints). ``first_moment`` as in
        ``path_to``."""
        total = (stage + 1) * self.K
        path: List[ExpertCheckpoint] = []
        for q in sorted({int(round(j * total / segments)) for j in range(segments + 1)}):
            s = max(0, q - 1) // self.K  # saved position q: checkpoint i of stage s (0: θ_0)
            i = q - s * self.K
            path.append(current[i] if s == stage else self._path_checkpoint(s, i, stage, first_moment))
        return path

    def _path_checkpoint(self, s: int, i: int, stage: int, first_moment: bool) -> ExpertCheckpoint:
        """Checkpoint ``i`` of the saved stage ``s`` for a path to ``stage``."""
        meta = self._meta(s)
        if meta is None:
            raise RunStateError(f"{self.stage_dir(s)}: the expert for stage {s} is missing; "
                                f"distill.segments needs every stage before {stage}")
        ck = meta["checkpoints"][i]
        c = self._load_checkpoint(s, int(ck["index"]), float(ck["lr"]))
        if not first_moment and c.optim is not None:
            c.optim = _without_first_moment(c.optim)
        return c

    def _load_checkpoint(self, stage: int, i: int, lr: float) -> ExpertCheckpoint:
        """Checkpoint ``i`` of a saved stage, with its optimiser state where one was saved."""
        d = self.stage_dir(stage)
        optim_uri = fs.join(d, f"optim-{i:02d}.pt")
        optim = _load_torch(optim_uri) if fs.exists(optim_uri) else None
        return ExpertCheckpoint(i, lr, _load_torch(fs.join(d, f"ckpt-{i:02d}.pt")), optim)

    def load_stage(self, stage: int) -> Optional[ExpertStage]:
        d = self.stage_dir(stage)
        meta = self._meta(stage)
        if meta is None:
            return None
        cks = [self._load_checkpoint(stage, int(c["index"]), float(c["lr"])) for c in meta["checkpoints"]]
        ref = EncodedRows.from_table(fs.read_parquet(fs.join(d, "ref.parquet")), self.fmap)
        return ExpertStage(stage, cks, ref, int(meta["train_rows"]), float(meta["wall_s"]), int(meta["sample_steps"]))
