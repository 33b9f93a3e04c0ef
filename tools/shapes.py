"""The shapes of Qwen2.5-Omni-3B and -7B thinkers (their config.json), for random-weight thinkers
of the real size in tools/bench.py --config 3b|7b.
"""

from synthetic import tiny

# the language models; the vision and audio towers are alike in both
REAL = {
    "7b": dict(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
    ),
    "3b": dict(
        hidden_size=2048,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        intermediate_size=11008,
        vocab_size=151936,
    ),
}
VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    fullatt_block_indexes=[7, 15, 23, 31],
)
AUDIO = dict(
    num_mel_bins=128,
    encoder_layers=32,
    encoder_attention_heads=20,
    encoder_ffn_dim=5120,
    d_model=1280,
)


def real_config(name, tokenizer):
    """Thinker config of Qwen2.5-Omni-3B/7B's shapes around this tokenizer's special-token ids."""
    from transformers import Qwen2_5OmniThinkerConfig

    base = tiny.tiny_config(tokenizer).to_dict()
    lm = REAL[name]
    # the tiny text config's layer_types list one entry per tiny layer: rebuilt from the count
    text = {k: v for k, v in base["text_config"].items() if k != "layer_types"}
    text.update(lm)
    text["head_dim"] = 128
    text["max_position_embeddings"] = 32768
    text["rope_parameters"] = dict(rope_theta=1e6, mrope_section=[16, 24, 24])
    audio = {**base["audio_config"], **AUDIO, "output_dim": lm["hidden_size"]}
    vision = {**base["vision_config"], **VISION, "out_hidden_size": lm["hidden_size"]}
    config = {**base, "text_config": text, "audio_config": audio, "vision_config": vision}
    return Qwen2_5OmniThinkerConfig(**config)
