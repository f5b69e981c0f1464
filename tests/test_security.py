"""Nothing exposed (issue 7): a local Ray node listens on loopback only; credentials from the
environment never reach logs, configs or the run directory; checkpoints are never unpickled."""
from __future__ import annotations

import io
import ipaddress
import logging
import os
from pathlib import Path
from typing import Dict, List, Tuple

import psutil
import pytest
import torch

from diet_ray.errors import RunStateError

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIADIETRAYLEAKCHECK1",
    "AWS_SECRET_ACCESS_KEY": "dietRaySecretLeakCheck/2f9b7c1e5a",
    "AWS_SESSION_TOKEN": "dietRayTokenLeakCheck-8d3e",
}


def _listening(procs: List[psutil.Process]) -> List[Tuple[int, str, str, int]]:
    out = []
    for p in procs:
        try:
            name = p.name()
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((p.pid, name, c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


@pytest.mark.ray
def test_local_ray_node_listens_on_loopback_only(ray_local):
    """Every socket the local node's processes (this driver, gcs_server, raylet, agents, workers)
    listen on is bound to 127.0.0.1 (or its IPv4-mapped form), never to * or a routable IP."""
    ray = ray_local

    @ray.remote(num_cpus=0)
    def worker_pid() -> int:
        return os.getpid()

    pids = set(ray.get([worker_pid.remote() for _ in range(2)]))
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    assert pids <= {p.pid for p in procs}, "the workers are not under this session's node"
    sockets = _listening(procs)
    names = {name for _, name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the check sees the node's servers
    exposed = [s for s in sockets if not _is_loopback(s[2])]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")


def _grep_tree(root: Path, needles: Dict[str, str]) -> List[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                blob = path.read_bytes()
            except OSError:
                continue
            hits += [f"{path}: {key}" for key, value in needles.items() if value.encode() in blob]
    return hits


@pytest.mark.ray
def test_credentials_never_land_in_logs_configs_or_the_run_dir(ray_local, tmp_path, monkeypatch, capsys, caplog):
    """``diet-ray prepare`` then ``run --verbose`` (two stages: expert, influence actors, commit)
    with AWS credentials in the environment: none of them is printed, logged (DEBUG included),
    written to any file of the run directory or of the Ray session's logs, or handed to Ray
    workers through the runtime env."""
    from diet_ray.cli import main
    from diet_ray.ray_runtime import _worker_env_vars

    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    caplog.set_level(logging.DEBUG)
    run_dir = tmp_path / "run"
    args = [
        "data.source=synthetic://default?rows=2000&stages=2&users=100&items=200", "data.stages.count=2",
        f"run.dir={run_dir}", "expert.model={model: dnn, embed_dim: 4, hidden: [8]}", "distill.outer_steps=0",
        "influence.num_actors=1",
    ]
    # The CLI's --verbose sets logger levels for the whole process: put them back afterwards.
    loggers = [logging.getLogger(n) for n in ("diet_ray", "ray", "diet_ray.distill.expert", "diet_ray.influence.ray_scoring")]
    levels = [lg.level for lg in loggers]
    try:
        assert main(["prepare", "--verbose", *args]) == 0
        assert main(["run", "--verbose", *args]) == 0
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    assert (run_dir / "stages" / "stage=0000" / "_SUCCESS").exists() and (run_dir / "config.yaml").exists()

    captured = capsys.readouterr()
    printed = captured.out + captured.err + caplog.text
    assert caplog.records, "nothing was logged: the check would be vacuous"
    for key, value in SECRETS.items():
        assert value not in printed, f"{key} was printed or logged"
        assert key not in _worker_env_vars()
    assert not _grep_tree(run_dir, SECRETS)
    session_logs = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs"
    assert session_logs.is_dir() and not _grep_tree(session_logs, SECRETS)


class _Payload:
    """Unpickling this runs a shell command (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_expert_checkpoint_is_refused_not_executed(tmp_path):
    from diet_ray.config import ExpertConfig
    from diet_ray.distill.expert import StreamExpert
    from test_expert import stage_rows, tiny_fmap

    fmap = tiny_fmap()
    cfg = ExpertConfig(model={"model": "lr"}, batch_size=64, checkpoints_per_stage=2, holdout_frac=0.1)
    ex = StreamExpert(fmap, cfg, seed=0, run_dir=str(tmp_path / "run"))
    ex.train_stage(0, stage_rows(0, 400))
    ckpt = sorted(Path(ex.stage_dir(0)).glob("ckpt-*.pt"))[-1]
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"state": _Payload(marker)}, buf)
    ckpt.write_bytes(buf.getvalue())

    with pytest.raises(RunStateError, match=str(ckpt)) as err:
        StreamExpert(fmap, cfg, seed=0, run_dir=str(tmp_path / "run")).load_stage(0)
    assert "Weights only load failed" in str(err.value) or "weights_only" in str(err.value)
    assert not marker.exists(), "the checkpoint's pickle was executed"
    torch.load(str(ckpt), weights_only=False)  # the payload is live: a plain load would run it
    assert marker.exists()


def test_no_unsafe_deserialisation_in_the_package():
    """Every torch.load passes weights_only=True; nothing calls pickle/np.load(allow_pickle)."""
    root = Path(__file__).resolve().parents[1] / "diet_ray"
    offenders = []
    for path in root.rglob("*.py"):
        for no, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{path}:{no}: {line.strip()}")
            if any(bad in code for bad in ("pickle.load", "pickle.loads", "allow_pickle=True", "read_pickle(", "cloudpickle.load")):
                offenders.append(f"{path}:{no}: {line.strip()}")
    assert not offenders, offenders
