"""The policy: a Qwen2.5-Omni Thinker and its processor (SPEC section 9).

`load_policy(path)` loads a `Qwen2_5OmniThinkerForConditionalGeneration` and its
`Qwen2_5OmniProcessor` from a local directory, offline: either a full Qwen2.5-Omni checkpoint
(thinker + talker + token2wav; only the thinker is built and only its weights are loaded) or a
thinker-only directory. `build_tiny(out_dir)` writes the embedded default: the same classes from
a tiny config with random weights, and a processor made offline around a byte-level BPE trained
in memory, so tests and the CPU demo run the real code path.

The tiny processor is sized for the synthetic world: 4 frames of 56x56 become 8 video tokens,
2 s of 16 kHz audio (32 mel bins) become 50 audio tokens. Call it as

    processor(text=prompts, videos=videos, audio=waves, padding=True, use_audio_in_video=False,
              videos_kwargs=video_kwargs(processor), return_tensors="pt")

`videos_kwargs` is needed because Qwen2_5OmniProcessor's class-level video size (at least
128*28*28 pixels) overrides the video processor's own saved size and would upscale small frames.
Generate with `model.generate(**inputs, use_audio_in_video=False, ...)`.
"""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5OmniProcessor,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    WhisperFeatureExtractor,
)

TINY_DIR = "runs/tiny"
MODEL_TYPES = ("qwen2_5_omni", "qwen2_5_omni_thinker")  # full checkpoint, thinker only
VOCAB_SIZE = 768  # BPE cap; the built-in corpus stops at 632 (256 bytes, 10 specials, merges)

# Qwen's multimodal tokens; as named tokenizer attributes the processor reads them
# (tokenizer.video_token, tokenizer.audio_bos_token, ...).
NAMED_TOKENS = {
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "audio_token": "<|AUDIO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *NAMED_TOKENS.values()]

# Qwen2.5-Omni's chat template without the default system prompt (it only costs tokens here).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif item['type'] == 'image' %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif item['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The built-in corpus: the prompt and answer vocabulary of the task, so that the think/answer
# tags, "In the video", "In the audio" and the six emotions are a few tokens each.
_EMOTIONS = ["neutral", "happy", "sad", "angry", "surprise", "worried"]
_FACES = [
    "the mouth curves up in a smile",
    "the mouth curves down in a frown",
    "the lips are flat and still",
    "the eyes are wide open and the brows are raised",
    "the face looks calm and relaxed",
    "nothing is visible",
]
_VOICES = [
    "the voice is high, loud and fast",
    "the voice is low, soft and slow",
    "the pitch is steady at a middle level",
    "the speaker sounds tense and shaky",
    "the tone rises sharply",
    "there is no sound",
]
DEFAULT_CORPUS = [
    "You are a helpful assistant that recognizes emotions from faces, voices and words.",
    "Watch the video and listen to the audio. What emotion does the person feel?",
    "First think about the visual and acoustic cues inside <think> </think>, "
    "then give the emotion inside <answer> </answer>.",
    "Answer with one word: neutral, happy, sad, angry, surprise or worried.",
    "The subtitle says: I can't believe this happened to me today! Why would anyone do that?",
    "She said that she was fine, but her hands were shaking and she looked away from the camera.",
    "He laughs and shouts, then the room goes quiet; nobody knows what to say next.",
    *(f"<think>In the video, {f}. In the audio, {v}.</think>" for f in _FACES for v in _VOICES),
    *(f"<answer>{e}</answer> The person is {e}." for e in _EMOTIONS),
]


class ModelDirError(FileNotFoundError, ValueError):
    """A model directory is missing, incomplete or unreadable; the message names the path."""


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def lm_params(model):
    """Parameters of the language model alone: decoder (with its embedding table) + lm_head,
    without the vision and audio towers. Tied weights count once."""
    params = {
        id(p): p
        for module in (model.model.language_model, model.lm_head)
        for p in module.parameters()
    }
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
            f"model directory {path}: config.json has model_type {model_type!r}, expected one of {MODEL_TYPES}"
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


def load_policy(path, dtype=torch.float32):
    """Load (thinker, processor) from a local full Qwen2.5-Omni or thinker-only directory, offline."""
    path = Path(path)
    config = _check_dir(path)
    try:
        # Built from the thinker's own config, no talker or token2wav is ever instantiated;
        # transformers' checkpoint conversion strips the `thinker.` prefix of a full checkpoint
        # and leaves the talker/token2wav tensors unread.
        thinker_dict = (
            config["thinker_config"] if config["model_type"] == "qwen2_5_omni" else config
        )
        thinker_config = Qwen2_5OmniThinkerConfig.from_dict(thinker_dict)
        model, info = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
            path,
            config=thinker_config,
            dtype=dtype,
            local_files_only=True,
            output_loading_info=True,
        )
    except Exception as err:  # re-raised with the path and the cause, whatever failed inside
        raise ModelDirError(
            f"model directory {path}: cannot load the thinker ({type(err).__name__}: {err})"
        ) from err
    # from_pretrained fills absent tensors with random values and only warns; a policy must not.
    absent = sorted(info["missing_keys"]) + sorted(key for key, *_ in info["mismatched_keys"])
    if absent:
        raise ModelDirError(
            f"model directory {path}: the weights lack {len(absent)} thinker tensors, e.g. {absent[:3]}"
        )
    try:
        processor = Qwen2_5OmniProcessor.from_pretrained(path, local_files_only=True)
    except Exception as err:
        raise ModelDirError(
            f"model directory {path}: cannot load the processor ({type(err).__name__}: {err})"
        ) from err
    return model, processor


def _train_tokenizer(corpus):
    """Byte-level BPE trained in memory: any text encodes, frequent words become single tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=4096,
        **NAMED_TOKENS,
    )


def tiny_processor(corpus=None):
    """A complete Qwen2_5OmniProcessor made offline, for 56x56 frames and 2 s of 16 kHz audio."""
    corpus = DEFAULT_CORPUS if corpus is None else list(corpus)
    if not corpus or not all(isinstance(s, str) for s in corpus):
        raise ValueError("corpus must be a non-empty list of strings")
    # Frames of 56x56 stay 56x56 (Qwen2-VL needs multiples of 28, at least 56); up to 112x112.
    vision = dict(
        size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(**vision),
        video_processor=Qwen2VLVideoProcessor(
            **vision, do_sample_frames=False, cap_pixels_per_frame=False
        ),
        # The processor pads audio to the whole chunk, so a 2 s chunk keeps the inputs small.
        feature_extractor=WhisperFeatureExtractor(
            feature_size=32, chunk_length=2, sampling_rate=16000
        ),
        tokenizer=_train_tokenizer(corpus),
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(tokenizer, size=1):
    """Thinker config of width 64*size: 2 text layers (head_dim 16), 2 vision blocks, 2 audio layers."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    width, heads = 64 * size, 4 * size
    # Split the rotary half-dimension into (time, height, width) as Qwen's [16, 24, 24] of 64.
    half = (width // heads) // 2
    t = half // 4
    h = (half - t) // 2
    mrope_section = [t, h, half - t - h]
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in NAMED_TOKENS.items()}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section},
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    vision = dict(
        depth=2,
        hidden_size=width,
        intermediate_size=2 * width,
        num_heads=heads,
        out_hidden_size=width,
        fullatt_block_indexes=[1],
        window_size=112,
    )
    audio = dict(
        num_mel_bins=32,
        encoder_layers=2,
        encoder_attention_heads=heads,
        encoder_ffn_dim=2 * width,
        d_model=width,
        output_dim=width,
        n_window=100,
    )
    return Qwen2_5OmniThinkerConfig(
        text_config=text,
        vision_config=vision,
        audio_config=audio,
        image_token_index=ids["image_token"],
        video_token_index=ids["video_token"],
        audio_token_index=ids["audio_token"],
        audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"],
        # Not a declared field, but get_rope_index reads it to find where each video starts.
        vision_start_token_id=ids["vision_bos_token"],
        vision_end_token_id=ids["vision_eos_token"],
        user_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        tie_word_embeddings=False,
    )


def build_tiny(out_dir=TINY_DIR, seed=0, size=1, corpus=None):
    """Write a tiny random thinker and its processor to `out_dir` with save_pretrained; return the path."""
    out_dir = Path(out_dir)
    processor = tiny_processor(corpus)
    tokenizer = processor.tokenizer
    with torch.random.fork_rng(devices=[]):  # seed the weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = Qwen2_5OmniThinkerForConditionalGeneration(tiny_config(tokenizer, size))
    # Stop at the end of the assistant turn, as Qwen's generation config does.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
