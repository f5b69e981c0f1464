"""What the fidelity bench's baselines take from the stream expert of one seed: influence
scores, row embeddings and soft labels, the same expert the DIET run of that seed trains."""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from diet_ray.config import Config, derive_seed
from diet_ray.data import fs
from diet_ray.data.stages import EncodedRows, StageStore
from diet_ray.schema import Batch


class ExpertSignals:
    """Per-stage influence scores and row embeddings from the stream expert of one seed."""

    def __init__(self, cfg: Config, store: StageStore, out: str, seed: int):
        from diet_ray.distill.expert import StreamExpert

        self.cfg, self.store, self.seed = cfg, store, seed
        self.expert = StreamExpert(store.fmap, cfg.expert, derive_seed(seed, "expert"), fs.join(out, "experts", f"s{seed}"))
        self._scores: Dict[int, np.ndarray] = {}

    def stage(self, t: int):
        return self.expert.train_through(self.store, t)

    def scores(self, s: int) -> np.ndarray:
        """TracIn (``influence.estimator``) of every row of D_s against stage s's reference set."""
        if s not in self._scores:
            from diet_ray.influence.scorer import InfluenceScorer

            es = self.stage(s)
            rows = self.store.read_stage(s)
            scorer = InfluenceScorer(self.expert.build_model(), es.checkpoints, es.ref_rows.batch(), self.cfg.influence,
                                     derive_seed(self.seed, "influence", s))
            self._scores[s] = scorer.score(rows.batch(), rows.row_id)
        return self._scores[s]

    def teacher_labelled(self, t: int, batch: Batch) -> Batch:
        """``batch`` with the labels DIET's slots get at stage t: the sigmoid of the stage-t
        expert's logit at its last checkpoint, clipped to +-memory.init_logit; unit weights."""
        z = self.expert.teacher(self.stage(t), float(self.cfg.memory.init_logit))(batch)
        return Batch(batch.ids, batch.numeric, torch.sigmoid(z), batch.probs, None)

    @torch.no_grad()
    def embeddings(self, t: int, rows: EncodedRows) -> np.ndarray:
        """Pooled field embeddings [N, F*W (+numeric)] under the expert's last checkpoint of stage t."""
        model = self.expert.build_model()
        model.load_state_dict(self.stage(t).checkpoints[-1].state)
        out = []
        for s in range(0, len(rows), 65536):
            r = rows.slice(s, s + 65536)
            ids = torch.as_tensor(r.cat).unsqueeze(-1)
            x = model.fields(model.gather(ids), None, torch.as_tensor(r.num))
            out.append(x.reshape(len(r), -1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)
