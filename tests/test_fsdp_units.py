"""FSDP2 units on 2 CPU ranks (tests/fsdp_units_worker.py under torchrun): weights read on rank 0
and broadcast equal a plain load, and a rollout's `parallel.unsharded` block leaves every unit
as it found it, so the next SFT step all-gathers as often as the one before."""

import json

import pytest
from train_runs import ROOT, finish, torchrun

pytest_plugins = ["train_runs"]


@pytest.fixture(scope="module")
def units(tiny_dir, synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("units") / "units.json"
    finish(torchrun(ROOT / "tests" / "fsdp_units_worker.py", tiny_dir, synth_dir, out))
    return json.loads(out.read_text())


def test_rank_0_alone_reads_the_weights_and_every_rank_gets_them(units):
    assert units["reads_per_rank"] == [1, 0]
    assert units["weights_equal"]
    # the rotary frequencies, which no state dict holds
    assert units["buffers"] > 0 and units["buffers_equal"]


def test_unsharded_restores_each_units_setting(units):
    assert units["settings_after"] == units["settings_before"]
    # the root (first) keeps its parameters from forward to backward; the other units reshard
    assert units["settings_before"][0] is False and all(units["settings_before"][1:])
    assert not units["root_reshards"]
    assert units["after"] == units["before"] > 0
