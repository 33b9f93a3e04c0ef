"""model.py: bad model directories fail with errors that name the path and the problem."""

import json
import re
import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from thinker.model import ModelDirError, load_policy

# bad model directories ---------------------------------------------------------------------------


def make_bad(kind, tiny_dir, root):
    path = root / kind
    if kind == "missing":
        return path
    path.mkdir()
    if kind == "config-only":
        shutil.copy(tiny_dir / "config.json", path)
    elif kind == "corrupt-config":
        shutil.copytree(tiny_dir, path, dirs_exist_ok=True)
        (path / "config.json").write_text('{"model_type": "qwen2_5_omni_thinker", ')
    elif kind == "wrong-model-type":
        shutil.copytree(tiny_dir, path, dirs_exist_ok=True)
        (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    elif kind == "no-processor":
        for name in ("config.json", "model.safetensors"):
            shutil.copy(tiny_dir / name, path)
    elif kind == "truncated-weights":
        shutil.copytree(tiny_dir, path, dirs_exist_ok=True)
        (path / "model.safetensors").write_bytes(
            (tiny_dir / "model.safetensors").read_bytes()[:1000]
        )
    elif kind == "partial-weights":
        shutil.copytree(tiny_dir, path, dirs_exist_ok=True)
        with safe_open(tiny_dir / "model.safetensors", "pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys() if key != "lm_head.weight"}
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize(
    "kind, what",
    [
        ("missing", "does not exist"),
        ("empty", "is empty"),
        ("config-only", "has no weights"),
        ("corrupt-config", "config.json is unreadable or corrupt"),
        ("wrong-model-type", "model_type 'llama'"),
        ("no-processor", "has no tokenizer files .* and no processor config"),
        ("truncated-weights", "cannot load the thinker"),
        ("partial-weights", r"the weights lack 1 thinker tensors, e.g. \['lm_head.weight'\]"),
    ],
)
def test_bad_model_dir_names_path_and_problem(kind, what, tiny_dir, tmp_path):
    path = make_bad(kind, tiny_dir, tmp_path)
    with pytest.raises(ModelDirError, match=re.escape(str(path)) + ".*" + what):
        load_policy(path)


def test_no_config_names_the_file(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path)) + " has no config.json"):
        load_policy(tmp_path)
