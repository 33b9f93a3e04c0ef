"""Every threshold flag of train.py reaches the code it governs and changes what it governs.

tau: the evidence tokens of a step (Eq. 9) and the evaluation's claims; theta: the evaluation's
recovered cues (U^m); rho: the masked inputs of the masked passes (Eq. 10); clamp: the masked
divergence (Eq. 10); eps_low / eps_high: the clipped surrogate (Eq. 6), which with one update
per rollout sees a ratio of exactly 1, so they can only be shown to arrive.
"""

from dataclasses import replace

import pytest
import torch

import data
import oppo
import reward
import rollout
import train
from corpora import labels
from matching.matcher import Matcher, Sim
from metrics import perception
from runtime import config
from thinker import batching, encoders, model, scoring

TEXT = (
    "<think>In the video, the mouth curves up in a smile. In the audio, the voice is low and "
    "quiet.</think><answer>happy</answer>"
)
# a visual clause that paraphrases the synthetic cues: its similarity to them is below 1
EVAL_TEXT = (
    "<think>In the video, the lips bend upward a little. In the audio, the voice is low and "
    "quiet.</think><answer>happy</answer>"
)
# the made-up similarity of the visual clause to its cue, and of the acoustic one to its own
S_VISUAL, S_ACOUSTIC = 0.7, 0.6


@pytest.fixture(scope="module")
def setup(tiny_dir, synth_dir, group):
    """(args, policy, processor, records, Rollout of G = 2 fixed completions per clip, sims)."""
    policy, processor = model.load_policy(tiny_dir)
    records = data.load_manifest(synth_dir / "train.jsonl")
    both = [r for r in records if "video" in r and "audio" in r][:2]
    media = batching.encode(processor, both, frames=4)
    ids = processor.tokenizer([TEXT] * 4, add_special_tokens=False, return_tensors="pt")
    ids = ids["input_ids"]  # (4, C)
    with torch.no_grad():
        video = encoders.encode_video(policy, media)
        audio = encoders.encode_audio(policy, media)
    roll = rollout.Rollout(
        records=[r for r in both for _ in range(2)],
        media=media,
        completion_ids=ids,
        completion_mask=torch.ones_like(ids),
        texts=[TEXT] * 4,
        G=2,
        positions=scoring.positions(policy, media),
        video=video,
        audio=audio,
    )
    spans = reward.clause_spans(TEXT)
    clauses = [TEXT[a:b] for a, b in spans]
    visual = torch.tensor([[S_VISUAL if "mouth" in c else 0.1] for c in clauses])  # (K, 1)
    acoustic = torch.tensor([[S_ACOUSTIC if "voice" in c else 0.1] for c in clauses])  # (K, 1)
    sims = [Sim(spans, {"visual": visual, "acoustic": acoustic})] * 4
    args = config.Args(profile="cpu", G=2, batch=2)
    config.apply_profile(args, torch.device("cpu"))
    return args, policy, processor, both, roll, sims


def test_tau_sets_the_evidence_tokens_of_a_step(setup):
    args, policy, processor, _, roll, sims = setup
    counts = {}
    for tau in (0.5, 0.65, 0.75):
        evidence = train.find_evidence(replace(args, tau=tau), policy, processor, roll, sims, 0)
        counts[tau] = (int(evidence.visual.sum()), int(evidence.acoustic.sum()))
    # the openers "In the video" and "In the audio" are evidence whatever tau (route_openers);
    # the clauses that state the cues only above it
    visual, acoustic = zip(*(counts[tau] for tau in (0.5, 0.65, 0.75)))
    assert visual[0] == visual[1] > visual[2] > 0
    assert acoustic[0] > acoustic[1] == acoustic[2] > 0


def test_rho_sets_the_masked_inputs_of_the_masked_passes(setup):
    args, policy, processor, _, roll, sims = setup
    masked = {}
    for rho in (0.5, 1.0):
        evidence = train.find_evidence(replace(args, rho=rho), policy, processor, roll, sims, 0)
        masked[rho] = evidence.logp_no_video
    rows = masked[1.0].ne(0).any(1)
    assert rows.any() and not torch.equal(masked[0.5], masked[1.0])


def test_clamp_and_eps_reach_the_update(setup, monkeypatch):
    args, policy, processor, _, roll, sims = setup
    evidence = train.find_evidence(args, policy, processor, roll, sims, 0)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    received = []
    policy_loss = oppo.policy_loss

    def recording(*pos, **kw):
        received.append((kw["eps_low"], kw["eps_high"]))
        return policy_loss(*pos, **kw)

    monkeypatch.setattr(oppo, "policy_loss", recording)
    kl = {}
    for clamp in (1e-7, 10.0):
        over = replace(args, clamp=clamp, eps_low=0.1, eps_high=0.4)
        metrics = oppo.update(over, policy, roll, adv, evidence)
        policy.zero_grad(set_to_none=True)
        kl[clamp] = metrics["kl_visual"]
    # the clamp in float32
    assert kl[1e-7] <= 1.0001e-7 < kl[10.0]
    assert received and all(eps == (0.1, 0.4) for eps in received)


@pytest.fixture(scope="module")
def answered(setup):
    """train.report_on with every completion `EVAL_TEXT` (rollout.generate stubbed): the matcher's
    real similarities decide the claims and the recovered cues."""
    return Matcher()


def report(args, setup, matcher, monkeypatch):
    _, policy, processor, records, _, _ = setup

    def fixed(model, processor, inputs, *rest, **kw):
        n = len(inputs["input_ids"])
        return None, None, [EVAL_TEXT] * n

    monkeypatch.setattr(rollout, "generate", fixed)
    # a loaded manifest, as train.py hands report_on (read in the built-in label space)
    manifest = data.Manifest(records, labels=labels.BUILTIN)
    return train.report_on(args, policy, processor, manifest, matcher, progress=False)


def test_tau_and_theta_set_the_evaluation_claims_and_recovered_cues(setup, answered, monkeypatch):
    args, _, _, records, _, _ = setup
    inventory = perception.cue_inventory([r["cues"] for r in records])
    sim = answered.similarities([EVAL_TEXT], [inventory])[0]
    claims = perception.claims(sim, 0.0)
    assert claims["visual"] > 0
    # a tau above every visual clause's similarity: no visual claim is left
    best = float(sim.S["visual"].max())
    assert best < 0.99
    low = report(replace(args, tau=0.0), setup, answered, monkeypatch)
    high = report(replace(args, tau=min(best + 0.01, 0.999)), setup, answered, monkeypatch)
    assert low["counts"]["claims_no_video"]["visual"] > 0
    assert high["counts"]["claims_no_video"]["visual"] == 0
    recovered = {}
    for theta in (0.05, 0.999):
        recovered[theta] = report(replace(args, theta=theta), setup, answered, monkeypatch)
        assert recovered[theta]["settings"]["theta"] == theta
    assert recovered[0.05]["metrics"]["U_visual"] > recovered[0.999]["metrics"]["U_visual"]
