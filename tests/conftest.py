"""Shared fixtures. Real logs come from ``../shared/data`` beside the clone (or $DIET_RAY_TEST_DATA)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    env = os.environ.get("DIET_RAY_TEST_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


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
