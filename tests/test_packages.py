"""What a machine needs: scripts/gpu_check.sh names a missing package within 30 s, before any GPU
work and without pytest; the media decoders load only where media files are decoded."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# a package "missing": None in sys.modules makes its import fail, and importlib.util.find_spec
# (what transformers asks) say there is none
HIDE = """import os, sys
for name in filter(None, os.environ["HIDE_PACKAGES"].split(",")):
    sys.modules[name] = None
"""


def hiding(tmp_path, *modules):
    """The environment of a process that cannot import `modules`."""
    folder = tmp_path / "hide"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(HIDE)
    env = {**os.environ, "PYTHONPATH": f"{folder}{os.pathsep}{ROOT}"}
    env["HIDE_PACKAGES"] = ",".join(modules)
    return env


@pytest.mark.parametrize(
    "module, package",
    [
        ("soundfile", "soundfile==0.14.0"),
        ("sklearn", "scikit-learn==1.9.1"),
        ("pytest", "pytest==9.2.0"),
    ],
)
def test_gpu_check_names_a_missing_package_within_30_s(tmp_path, module, package):
    env = hiding(tmp_path, module)
    # no wheels to install, nothing carried: the machine as it is
    env.update(PYTHON=sys.executable, WHEELS=str(tmp_path / "none"), ASSETS=str(tmp_path / "none"))
    began = time.monotonic()
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    took = time.monotonic() - began
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert took < 30
    assert package in proc.stderr
    assert "pip install --no-index --find-links .whl" in proc.stderr
    # it stopped at the package check: no GPU asked for, no test started
    assert "GPU:" not in proc.stdout and "sees no CUDA GPU" not in proc.stderr
    assert "test_gpu.py" not in proc.stdout


def test_the_package_check_passes_at_the_pins(tmp_path):
    script = [sys.executable, "scripts/check_packages.py", "tqdm", "pytest", "--any-version", "av"]
    proc = subprocess.run(script, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "tqdm 4.70.1" in proc.stdout
    unpinned = [sys.executable, "scripts/check_packages.py", "nothing"]
    proc = subprocess.run(unpinned, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "pins no nothing" in proc.stderr


def test_training_on_synthetic_caches_needs_no_media_decoder(tmp_path, tiny_dir, synth_dir):
    """train.py's imports, a manifest's load and a batch of cached clips, without PyAV, soundfile
    or torchaudio (a GPU machine running the carried world needs none of them)."""
    code = f"""
import sys
import data, train
from thinker import batching, model
processor = model.load_policy({str(tiny_dir)!r})[1]
records = data.load_manifest({str(synth_dir / "train.jsonl")!r})
batch = batching.encode(processor, records[:3], frames=4)
assert batch["input_ids"].shape[0] == 3 and "pixel_values_videos" in batch
print(sorted(m for m in ("av", "soundfile", "torchaudio") if sys.modules.get(m)))
"""
    env = hiding(tmp_path, "av", "soundfile", "torchaudio")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
