"""``ray.num_workers`` / ``influence.num_actors``: ``auto`` runs in the driver on a local
single-node runtime and on Train workers / an actor pool on a cluster; numbers are honoured;
the config hash keeps ``auto`` so resuming does not depend on what it resolved to."""
from __future__ import annotations

import pytest

from diet_ray import config as C
from diet_ray import parallelism as P


def _nodes(monkeypatch, alive: int) -> None:
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}] * alive + [{"Alive": False}])


def test_auto_is_the_driver_on_a_local_runtime(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = C.load_config(None, [])
    assert (cfg.ray.num_workers, cfg.influence.num_actors) == ("auto", "auto")
    par = P.resolve(cfg)  # Ray not started: init_ray would start the local runtime
    assert (par.num_workers, par.num_actors, par.path, par.influence_path) == (0, 0, "driver", "driver")
    _nodes(monkeypatch, 1)
    assert P.resolve(cfg).path == "driver" and "local single-node" in P.resolve(cfg).reason


def test_auto_uses_workers_and_actors_on_a_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = C.load_config(None, ["ray.address=ray://head:10001"])
    par = P.resolve(cfg)
    assert (par.num_workers, par.num_actors) == (P.CLUSTER_WORKERS, P.CLUSTER_ACTORS)
    assert par.path == "train_workers=2" and par.influence_path == "actors=2" and "ray://head" in par.reason
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # as under `ray job submit`
    assert P.resolve(C.load_config(None, [])).num_workers == P.CLUSTER_WORKERS
    monkeypatch.delenv("RAY_ADDRESS")
    _nodes(monkeypatch, 3)
    par = P.resolve(C.load_config(None, []))
    assert (par.num_workers, par.num_actors) == (2, 2) and "3-node" in par.reason


def test_numbers_are_honoured_and_apply_keeps_the_configured_hash(monkeypatch):
    _nodes(monkeypatch, 3)
    cfg = C.load_config(None, ["ray.num_workers=0", "influence.num_actors=1"])
    par = P.resolve(cfg)
    assert (par.num_workers, par.num_actors, par.reason) == (0, 1, "configured")
    auto = C.load_config(None, [])
    resolved = P.apply(auto)
    assert resolved.ray.num_workers == 2 and auto.ray.num_workers == "auto"  # a copy
    assert P.workers(auto) == 2 and P.actors(auto.influence, auto.ray) == 2


def test_resume_under_auto_of_a_run_dir_made_with_numbers(tmp_path):
    """A run dir made with an explicit number of actors (a result key) resumes under auto with
    that number; one made under auto resumes under auto whatever it resolves to."""
    from diet_ray.errors import RunStateError
    from diet_ray.run_dir import open_run_dir

    run = f"run.dir={tmp_path / 'r'}"
    made = C.load_config(None, [run, "influence.num_actors=2", "ray.num_workers=2"])
    open_run_dir(made)
    again = C.load_config(None, [run])
    open_run_dir(again)
    assert again.influence.num_actors == 2 and C.config_hash(again) == C.config_hash(made)
    with pytest.raises(RunStateError, match="influence.num_actors changed"):  # explicit numbers are honoured
        open_run_dir(C.load_config(None, [run, "influence.num_actors=0"]))

    run = f"run.dir={tmp_path / 'a'}"
    first = C.load_config(None, [run])
    open_run_dir(first)
    later = C.load_config(None, [run])
    open_run_dir(later)
    assert later.influence.num_actors == "auto" and C.config_hash(later) == C.config_hash(first)
