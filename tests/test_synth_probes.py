"""The synthetic world's modalities are really separate: a nearest-centroid probe on each
modality's raw features finds valence in the face, arousal in the voice, and each label-free
detail in its own modality (docs/method.md, section 10)."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from synthetic import plan as synth_plan


# ---------------------------------------------------------------- probes on raw features
@contextmanager
def one_thread():
    """Thousands of tiny tensor ops: thread hand-offs would cost more than the work itself."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def face_features(frames):
    """Ink (dark pixels) in a crop centred on the face (the bright skin blob), averaged over
    frames."""
    feats = []
    for gray in frames.float().mean(-1):  # (H, W)
        ys, xs = torch.nonzero(gray > 135, as_tuple=True)  # skin is brighter than any background
        cy, cx = int(ys.float().mean().round()) + 16, int(xs.float().mean().round()) + 16
        crop = torch.nn.functional.pad(gray, (16, 16, 16, 16))[cy - 14 : cy + 15, cx - 12 : cx + 13]
        feats.append((crop < 0.7 * crop.median()).float())
    return torch.stack(feats).mean(0).flatten()


def voice_features(wave):
    """Mean log power spectrum up to 4 kHz plus the level and spread of the frame energy."""
    # (F, T)
    power = (
        torch.stft(wave, 512, 256, window=torch.hann_window(512), return_complex=True).abs() ** 2
    )
    energy = power.sum(0).log()
    return torch.cat(
        [(power.mean(1) + 1e-8).log()[:128], torch.stack([energy.mean(), energy.std()])]
    )


def centroid_accuracy(X, y):
    """Two-fold nearest-centroid accuracy on standardised features."""
    X, y = (X - X.mean(0)) / (X.std(0) + 1e-6), np.array(y)
    accs = []
    for fold in (0, 1):
        train, test = np.arange(len(y)) % 2 != fold, np.arange(len(y)) % 2 == fold
        classes = sorted(set(y[train]))
        centroids = torch.stack([X[train][y[train] == c].mean(0) for c in classes])
        accs.append(
            np.mean(np.array(classes)[torch.cdist(X[test], centroids).argmin(1).numpy()] == y[test])
        )
    return float(np.mean(accs))


@pytest.fixture(scope="module")
def features(synth_world):
    out, records = synth_world
    recs = records["train"] + records["val"]
    caches = [load_file(str(out / r["cache"])) for r in recs]
    with one_thread():
        face = [
            (r, face_features(c["frames"]))
            for r, c in zip(recs, caches)
            if r["render"]["video"] == "face"
        ]
        voice = [
            (r, voice_features(c["waveform"]))
            for r, c in zip(recs, caches)
            if r["render"]["audio"] == "voice"
        ]
    return face, voice, caches


def everything(r):
    return True


def valence_of(r):
    return synth_plan.VALENCE[r["label"]]


def arousal_of(r):
    return synth_plan.AROUSAL[r["label"]]


def label_of(r):
    return r["label"]


def high_arousal(r):
    """happy / angry / surprise: told apart by valence."""
    return synth_plan.AROUSAL[r["label"]] == "high"


def frowning(r):
    """sad / worried / angry: told apart by arousal."""
    return synth_plan.VALENCE[r["label"]] == "frown"


def _probe(pairs, keep, target):
    chosen = [(r, x) for r, x in pairs if keep(r)]
    assert len(chosen) >= 40
    return centroid_accuracy(torch.stack([x for _, x in chosen]), [target(r) for r, _ in chosen])


def test_face_carries_valence_and_voice_arousal_not_the_other_way_round(features):
    face, voice, _ = features
    assert _probe(face, everything, valence_of) > 0.9
    assert _probe(voice, everything, arousal_of) > 0.9
    # chance is 1/3
    assert (
        _probe(face, high_arousal, label_of) > 0.9 and _probe(voice, high_arousal, label_of) < 0.55
    )
    assert _probe(voice, frowning, label_of) > 0.9 and _probe(face, frowning, label_of) < 0.55
    # One modality alone is capped near 50% on the six labels (docs/method.md, section 10).
    assert (
        0.35 < _probe(face, everything, label_of) < 0.6
        and 0.35 < _probe(voice, everything, label_of) < 0.6
    )


@one_thread()
def test_label_free_details_are_visible_in_their_own_modality(synth_world, features):
    _, records = synth_world
    faces, voices = [], []
    for r, cache in zip(records["train"] + records["val"], features[2]):
        if r["render"]["video"] == "face":
            gray = cache["frames"].float().mean(-1)  # (T, H, W)
            centre = torch.stack([torch.nonzero(g > 135).float().mean(0) for g in gray])  # (T, 2)
            sway = (centre[1::2].mean(0) - centre[0::2].mean(0)).abs()  # a nod moves y, a shake x
            cy, cx = centre.mean(0).round().int().tolist()
            # the eye band
            eyes = torch.nn.functional.pad(gray.mean(0), (16,) * 4)[
                cy + 6 : cy + 15, cx + 6 : cx + 27
            ]
            ink = (eyes < 0.7 * eyes.median()).float().mean()  # wide eyes: more ink, narrowed: less
            faces.append((r["render"]["face_detail"], torch.cat([sway, ink[None]])))
        if r["render"]["audio"] == "voice":
            stft = torch.stft(
                cache["waveform"], 1024, 256, window=torch.hann_window(1024), return_complex=True
            )
            power, hz = stft.abs() ** 2, torch.arange(stft.shape[0]) * 16000 / 1024  # (F, T), (F,)
            band = (hz > 60) & (hz < 2000)
            # (T,) spectral centroid
            centroid = (power[band] * hz[band, None]).sum(0) / power[band].sum(0)
            # the contour moves over the second half: compare its end with the first part
            n = len(centroid)
            voices.append(
                (
                    r["render"]["voice_detail"],
                    (
                        centroid[int(0.8 * n) :].mean() / centroid[n // 10 : int(0.4 * n)].mean()
                    ).log()[None],
                )
            )
    # 5 classes
    assert centroid_accuracy(torch.stack([x for _, x in faces]), [str(d) for d, _ in faces]) > 0.75
    # 3 classes
    assert (
        centroid_accuracy(torch.stack([x for _, x in voices]), [str(d) for d, _ in voices]) > 0.75
    )
