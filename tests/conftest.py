"""Shared fixtures: one tiny thinker and one small synthetic world per test session."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    import synth

    out = tmp_path_factory.mktemp("synth")
    synth.make_world(out, n_train=48, n_val=12, n_test=12, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    import model

    return model.build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)
