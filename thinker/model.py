"""The policy: a Qwen2.5-Omni Thinker and its processor (docs/method.md, section 9).

`load_policy(path)` loads a `Qwen2_5OmniThinkerForConditionalGeneration` and its
`Qwen2_5OmniProcessor` from a local directory, offline: either a full Qwen2.5-Omni checkpoint
(thinker + talker + token2wav; only the thinker is built and only its weights are loaded) or a
thinker-only directory. The default policy, a tiny random-weight thinker, is written by
tiny.build_tiny. Call the processor as

    processor(text=prompts, videos=videos, audio=waves, padding=True, use_audio_in_video=False,
              videos_kwargs=video_kwargs(processor), return_tensors="pt")

`videos_kwargs` is needed because Qwen2_5OmniProcessor's class-level video size (at least
128*28*28 pixels) overrides the video processor's own saved size and would upscale small frames.
Generate with `thinker.generate(**inputs, use_audio_in_video=False, ...)`.
"""

import json
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    Qwen2_5OmniProcessor,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
)

MODEL_TYPES = ("qwen2_5_omni", "qwen2_5_omni_thinker")  # full checkpoint, thinker only


class ModelDirError(FileNotFoundError, ValueError):
    """A model directory is missing, incomplete or unreadable; the message names the path."""


def num_params(thinker):
    return sum(p.numel() for p in thinker.parameters())


def lm_params(thinker):
    """Parameters of the language model alone: decoder (with its embedding table) + lm_head,
    without the vision and audio towers. Tied weights count once."""
    params = {}
    for module in (thinker.model.language_model, thinker.lm_head):
        for p in module.parameters():
            params[id(p)] = p
    return sum(p.numel() for p in params.values())


def video_kwargs(processor):
    """`videos_kwargs` that make the processor honour its video processor's own saved size."""
    size = processor.video_processor.size
    return {"size": {"shortest_edge": size.shortest_edge, "longest_edge": size.longest_edge}}


def _check_dir(path):
    """Raise ModelDirError naming `path` and what is missing; return the parsed config.json."""
    if not path.exists():
        raise ModelDirError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ModelDirError(f"model directory {path} is not a directory")
    try:
        files = {p.name for p in path.iterdir()}
    except OSError as err:
        raise ModelDirError(f"model directory {path} cannot be listed ({err})") from None
    if not files:
        raise ModelDirError(
            f"model directory {path} is empty: no config.json, weights or processor files"
        )
    if "config.json" not in files:
        raise ModelDirError(f"model directory {path} has no config.json")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelDirError(
            f"model directory {path}: config.json is unreadable or corrupt ({err})"
        ) from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in MODEL_TYPES:
        raise ModelDirError(
            f"model directory {path}: config.json has model_type {model_type!r}, "
            f"expected one of {MODEL_TYPES}"
        )
    if model_type == "qwen2_5_omni" and not isinstance(config.get("thinker_config"), dict):
        raise ModelDirError(
            f"model directory {path}: config.json of a full Qwen2.5-Omni has no thinker_config"
        )
    if not any(f.endswith(".safetensors") or f.startswith("pytorch_model") for f in files):
        raise ModelDirError(
            f"model directory {path} has no weights (*.safetensors or pytorch_model*.bin)"
        )
    missing = []
    if "tokenizer_config.json" not in files or not {"tokenizer.json", "vocab.json"} & files:
        missing.append("tokenizer files (tokenizer_config.json with tokenizer.json or vocab.json)")
    if not {"preprocessor_config.json", "processor_config.json"} & files:
        missing.append("processor config (preprocessor_config.json or processor_config.json)")
    if missing:
        raise ModelDirError(f"model directory {path} has no {' and no '.join(missing)}")
    return config


def load_policy(path, dtype=torch.float32, meta=False):
    """(thinker, processor) from a local full Qwen2.5-Omni or thinker-only directory, offline.

    meta=True builds the thinker on the meta device without reading its weights, in eval mode
    as from_pretrained gives it, for runtime.parallel.load to shard and fill.
    """
    path = Path(path)
    config = _check_dir(path)
    try:
        # Built from the thinker's own config, no talker or token2wav is ever instantiated;
        # transformers' checkpoint conversion strips the `thinker.` prefix of a full checkpoint
        # and leaves the talker/token2wav tensors unread.
        thinker_dict = config
        if config["model_type"] == "qwen2_5_omni":
            thinker_dict = config["thinker_config"]
        thinker_config = Qwen2_5OmniThinkerConfig.from_dict(thinker_dict)
        if meta:
            return empty_thinker(path, thinker_config, dtype), load_processor(path)
        thinker, info = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
            path,
            config=thinker_config,
            dtype=dtype,
            local_files_only=True,
            output_loading_info=True,
        )
    except Exception as err:
        # re-raised with the path and the cause, whatever failed inside
        raise ModelDirError(
            f"model directory {path}: cannot load the thinker ({type(err).__name__}: {err})"
        ) from err
    # from_pretrained fills absent tensors with random values and only warns; a policy must not.
    absent = sorted(info["missing_keys"]) + sorted(key for key, *_ in info["mismatched_keys"])
    if absent:
        raise ModelDirError(
            f"model directory {path}: the weights lack {len(absent)} thinker tensors, "
            f"e.g. {absent[:3]}"
        )
    return thinker, load_processor(path)


def load_processor(path):
    try:
        return Qwen2_5OmniProcessor.from_pretrained(path, local_files_only=True)
    except Exception as err:
        raise ModelDirError(
            f"model directory {path}: cannot load the processor ({type(err).__name__}: {err})"
        ) from err


def empty_thinker(path, thinker_config, dtype):
    """The thinker of `thinker_config` on the meta device, with the directory's generation
    config when it has one (as from_pretrained reads it)."""
    with torch.device("meta"):
        thinker = Qwen2_5OmniThinkerForConditionalGeneration(thinker_config).to(dtype)
    if (path / "generation_config.json").is_file():
        thinker.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    return thinker.eval()
