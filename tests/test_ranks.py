"""What depends on the number of ranks: each rank's random stream (parallel.rank_seed) and a
checkpoint's world size, which a --resume on another number of ranks is refused for."""

import json

import pytest
import torch

from runtime import checkpoint, config, parallel, rundir

# DCP read and written in one process
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def test_rank_0_keeps_the_seed_and_no_seed_and_rank_share_a_stream():
    """seed + rank gave seed s on rank r + 1 the stream of seed s + 1 on rank r."""
    seeds = [0, 1, 2, 7, 2**19, 2**20 - 1]
    assert [parallel.rank_seed(seed, 0) for seed in seeds] == seeds
    pairs = [(seed, rank) for seed in seeds for rank in range(8)]
    streams = {parallel.rank_seed(seed, rank) for seed, rank in pairs}
    assert len(streams) == len(pairs)
    assert parallel.rank_seed(0, 1) != parallel.rank_seed(1, 0)
    # what each stream draws differs too (torch's CPU generator reads 32 bits of a seed)
    draws = set()
    for seed, rank in [(0, 1), (1, 0), (0, 0), (1, 1), (2**20 - 1, 4095), (2**20 - 1, 0)]:
        torch.manual_seed(parallel.rank_seed(seed, rank))
        draws.add(tuple(torch.randint(0, 2**30, (4,)).tolist()))
    assert len(draws) == 6
    for bad in (-1, 2**20):
        with pytest.raises(ValueError, match="--seed"):
            parallel.rank_seed(bad, 0)
    with pytest.raises(ValueError, match="4096 ranks"):
        parallel.rank_seed(0, 4096)


def save(path, world, monkeypatch):
    """A checkpoint written as rank 0 of `world` ranks would write it."""
    model = torch.nn.Linear(2, 2)
    optim = torch.optim.AdamW(model.parameters())
    with monkeypatch.context() as mp:
        mp.setattr(checkpoint, "_world", lambda: world)
        checkpoint.save(path, 2, model, optim)
    return model, optim


@pytest.mark.parametrize("saved, now", [(2, 1), (1, 2), (8, 4)])
def test_a_checkpoint_loads_only_on_the_world_size_that_wrote_it(tmp_path, monkeypatch, saved, now):
    model, optim = save(tmp_path, saved, monkeypatch)
    path = checkpoint.latest(tmp_path)
    assert checkpoint.saved_world(path) == saved
    monkeypatch.setattr(checkpoint, "_world", lambda: now)
    with pytest.raises(checkpoint.WorldSizeError, match=f"written by {saved} rank"):
        checkpoint.load(path, model, optim)
    monkeypatch.setattr(checkpoint, "_world", lambda: saved)
    assert checkpoint.load(path, model, optim) == 2


def test_a_resume_on_another_world_size_is_refused_before_the_first_step(
    group, tmp_path, monkeypatch
):
    """rundir.check_resume's refusal, said once on rank 0, with the number to resume with."""
    args = config.Args(profile="cpu", out=str(tmp_path), stages="sft", resume=True)
    config.apply_profile(args, torch.device("cpu"))
    stage = tmp_path / "sft"
    save(stage / "ckpt", 2, monkeypatch)
    (stage / "args.json").write_text(json.dumps(rundir.stage_flags(args, "sft")))
    changes, problem = rundir.resume_changes(args, ["sft"])
    assert "written by 2 rank(s), this run has 1" in problem
    assert "--nproc_per_node=2" in problem
    with pytest.raises(SystemExit, match="written by 2 rank"):
        rundir.check_resume(args)
