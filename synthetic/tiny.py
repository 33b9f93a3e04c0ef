"""The tiny Qwen2.5-Omni Thinker: the default policy, built offline with random weights.

`build_tiny(out_dir)` writes the same classes as a real checkpoint, from a tiny config, and a
processor made offline around a byte-level BPE trained in memory, so tests and the CPU demo run
the real code path (docs/method.md, section 9). model.load_policy reads the directory back.

The tiny processor is sized for the synthetic world: 4 frames of 56x56 become 8 video tokens,
2 s of 16 kHz audio (32 mel bins) become 50 audio tokens.
"""

import itertools
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
# BPE cap; the built-in corpus stops at 632 (256 bytes, 10 specials, merges)
VOCAB_SIZE = 768

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
_THINKING = [
    f"<think>In the video, {face}. In the audio, {voice}.</think>"
    for face, voice in itertools.product(_FACES, _VOICES)
]
_ANSWERS = [f"<answer>{e}</answer> The person is {e}." for e in _EMOTIONS]
DEFAULT_CORPUS = [
    "You are a helpful assistant that recognizes emotions from faces, voices and words.",
    "Watch the video and listen to the audio. What emotion does the person feel?",
    "First think about the visual and acoustic cues inside <think> </think>, "
    "then give the emotion inside <answer> </answer>.",
    "Answer with one word: neutral, happy, sad, angry, surprise or worried.",
    "The subtitle says: I can't believe this happened to me today! Why would anyone do that?",
    "She said that she was fine, but her hands were shaking and she looked away from the camera.",
    "He laughs and shouts, then the room goes quiet; nobody knows what to say next.",
    *_THINKING,
    *_ANSWERS,
]


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
    """Thinker config of width 64*size: 2 text layers (head_dim 16), 2 vision blocks and 2 audio
    layers."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    width = 64 * size
    heads = 4 * size
    # Split the rotary half-dimension into (time, height, width) as Qwen's [16, 24, 24] of 64.
    half = (width // heads) // 2
    time_dims = half // 4
    height_dims = (half - time_dims) // 2
    mrope_section = [time_dims, height_dims, half - time_dims - height_dims]
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
    """Write a tiny random thinker and its processor to `out_dir` (save_pretrained); return it."""
    out_dir = Path(out_dir)
    processor = tiny_processor(corpus)
    tokenizer = processor.tokenizer
    # seed the weights without touching the caller's random state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = tiny_config(tokenizer, size)
        thinker = Qwen2_5OmniThinkerForConditionalGeneration(config)
    # Stop at the end of the assistant turn, as Qwen's generation config does.
    thinker.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    thinker.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    thinker.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
