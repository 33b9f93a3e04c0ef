"""Shared fixtures: one tiny thinker and small synthetic worlds per test session.

With OPPO_TEST_ASSETS set, `synth_dir` and `tiny_dir` are its synth/ and tiny/, built beforehand
by scripts/gpu_assets.py for a machine that cannot build them (no PyAV to write the videos).
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)
# the world of `synth_dir` and the seed of `tiny_dir`
WORLD = dict(n_train=48, n_val=12, n_test=12, seed=0)
TINY_SEED = 0
ASSETS = os.environ.get("OPPO_TEST_ASSETS")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    if ASSETS:
        return Path(ASSETS) / "synth"
    from synthetic import world

    out = tmp_path_factory.mktemp("synth")
    world.make_world(out, **WORLD)
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    if ASSETS:
        return Path(ASSETS) / "tiny"
    from synthetic import tiny

    return tiny.build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=TINY_SEED)


@pytest.fixture(scope="session")
def manifest_world(tmp_path_factory):
    """(directory, loaded train records) of a 24/6/6-clip world, seed 7: the data tests' world."""
    import data
    from synthetic import world

    out = tmp_path_factory.mktemp("world")
    paths = world.make_world(out, 24, 6, 6, seed=7, workers=1)
    return out, data.load_manifest(paths["train"])


@pytest.fixture(scope="session")
def synth_world(tmp_path_factory):
    """(directory, {split: records as written}) of a 240/60/12-clip world, seed 3, made by two
    processes: the synthetic world's tests."""
    from synthetic import world

    out = tmp_path_factory.mktemp("synth_world")
    paths = world.make_world(out, 240, 60, 12, seed=3, workers=2)
    records = {}
    for split, path in paths.items():
        records[split] = [json.loads(line) for line in open(path)]
    return out, records


@pytest.fixture(scope="module")
def group():
    """The 1-process group train.py makes (parallel.init), for parallel.shard and the export."""
    import torch.distributed as dist

    from runtime import parallel

    parallel.init()
    yield
    dist.destroy_process_group()
