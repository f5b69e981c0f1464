"""Shared fixtures. Real logs come from ``../shared/data`` beside the clone (or $DIET_RAY_TEST_DATA)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# A private, short Ray temp root (Unix socket paths < 108 chars) for this test session and the
# processes it starts: the marker guard below counts the Ray sessions created under it, and Ray
# runs elsewhere on the machine neither disturb nor are disturbed by the tests.
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="drt", dir="/tmp"))

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    env = os.environ.get("DIET_RAY_TEST_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


REAL_DATA_FIXTURES = ("shared_data", "movielens", "taobao")


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _have_real_data() -> bool:
    return (_data_root() / "ml-latest-small" / "ratings.csv").exists()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = _data_root()
    if not (root / "ml-latest-small" / "ratings.csv").exists():
        pytest.skip(f"real logs not found under {root} (set DIET_RAY_TEST_DATA)")
    return root


@pytest.fixture(scope="session")
def movielens(shared_data) -> Path:
    return shared_data / "ml-latest-small"


@pytest.fixture(scope="session")
def taobao(shared_data) -> Path:
    return shared_data / "taobao-userbehavior-head" / "UserBehavior_head.csv"


@pytest.fixture(scope="session")
def configs_dir() -> Path:
    return REPO / "configs"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray runtime for the whole session (start-up costs 5-10 s)."""
    import ray

    from diet_ray.config import RayConfig
    from diet_ray.ray_runtime import init_ray

    init_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


def _ray_sessions() -> set:
    root = Path(os.environ["RAY_TMPDIR"]) / "ray"
    return {p.name for p in root.glob("session_2*")} if root.exists() else set()


def _ray_up() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


@pytest.fixture(autouse=True)
def _ray_marker_guard(request):
    """Every test that starts Ray, in process or in a subprocess it launches, carries the ``ray``
    marker (``-m "not ray"`` then really runs without Ray). Detected by the ``ray_local`` fixture,
    by a new session directory under RAY_TMPDIR, or by a runtime left up by the test."""
    if request.node.get_closest_marker("ray") is not None:
        yield
        return
    if "ray_local" in request.fixturenames:
        pytest.fail(f"{request.node.nodeid} uses the ray_local fixture but lacks @pytest.mark.ray")
    before, was_up = _ray_sessions(), _ray_up()
    yield
    started = sorted(_ray_sessions() - before)
    if started or (_ray_up() and not was_up):
        pytest.fail(f"{request.node.nodeid} started Ray ({', '.join(started) or 'in process'}) but lacks @pytest.mark.ray")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA (CI has none)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
    # Under CI the real logs must be there: a missing ../shared/data stops the run in one line
    # instead of quietly skipping the real-data tests.
    if _on_ci() and not _have_real_data():
        needing = [i for i in items if set(REAL_DATA_FIXTURES) & set(getattr(i, "fixturenames", ()))]
        if needing:
            pytest.exit(f"CI=true: {len(needing)} tests need the real logs, not found under {_data_root()} "
                        "(put them in ../shared/data beside the clone or set DIET_RAY_TEST_DATA)", returncode=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_binary() -> str:
    beside = Path(sys.executable).parent / "moto_server"
    found = shutil.which("moto_server") or (str(beside) if beside.exists() else None)
    if not found:
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    return found


@pytest.fixture(scope="module")
def s3_endpoint():
    """A local S3 (moto_server on 127.0.0.1, started and stopped by PID) with a bucket ``logs``;
    yields (endpoint_url, boto3 client). Test credentials are set in os.environ meanwhile."""
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.Popen([_moto_binary(), "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        deadline = time.time() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("moto_server did not start")
                time.sleep(0.1)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="logs")
        yield endpoint, client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        from diet_ray.data import fs

        fs.configure(None, None)
