"""tiny.py: the tiny thinker and its processor round-trip through save_pretrained / load_policy
exactly, are seeded, agree on their token ids, and the byte-level BPE encodes any text
(docs/method.md, section 9)."""

import pytest
import torch
from safetensors import safe_open
from thinker_inputs import PROMPT, encode_prompt, logits, random_media
from torch.testing import assert_close
from transformers import Qwen2_5OmniThinkerForConditionalGeneration

from synthetic.tiny import NAMED_TOKENS, build_tiny, tiny_config, tiny_processor
from thinker.model import load_policy, num_params


@pytest.fixture(scope="module")
def policy(tiny_dir):
    thinker, processor = load_policy(tiny_dir)
    return thinker.eval(), processor


@pytest.fixture(scope="module")
def batch(policy):
    return encode_prompt(policy[1], *random_media(0))


def test_round_trip_gives_identical_logits(policy, batch, tmp_path):
    thinker, processor = policy
    # The same construction as build_tiny, in memory: the saved weights are the built ones.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = Qwen2_5OmniThinkerForConditionalGeneration(
            tiny_config(processor.tokenizer)
        ).eval()
    assert_close(logits(thinker, batch), logits(reference, batch), rtol=0, atol=0)
    # And a second save/load of the loaded policy changes nothing, processor included.
    thinker.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    thinker2, processor2 = load_policy(tmp_path)
    batch2 = encode_prompt(processor2, *random_media(0))
    assert batch2.keys() == batch.keys()
    for key in batch:
        assert_close(batch2[key], batch[key], rtol=0, atol=0)
    assert_close(logits(thinker2.eval(), batch2), logits(thinker, batch), rtol=0, atol=0)


def test_build_tiny_is_seeded(tiny_dir, tmp_path):
    def weights(path):
        with safe_open(path / "model.safetensors", "pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}

    state = torch.random.get_rng_state()
    same, other = (
        weights(build_tiny(tmp_path / "a", seed=0)),
        weights(build_tiny(tmp_path / "b", seed=1)),
    )
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    first = weights(tiny_dir)
    assert all(torch.equal(same[k], first[k]) for k in first)
    assert not torch.equal(other["lm_head.weight"], first["lm_head.weight"])


def test_tiny_config_and_tokenizer_agree(policy):
    thinker, processor = policy
    tok, config = processor.tokenizer, thinker.config
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in NAMED_TOKENS.items()}
    assert (config.image_token_id, config.video_token_id, config.audio_token_id) == (
        ids["image_token"],
        ids["video_token"],
        ids["audio_token"],
    )
    assert (config.audio_start_token_id, config.audio_end_token_id) == (
        ids["audio_bos_token"],
        ids["audio_eos_token"],
    )
    assert (config.vision_start_token_id, config.vision_end_token_id) == (
        ids["vision_bos_token"],
        ids["vision_eos_token"],
    )
    assert len(set(ids.values())) == len(ids) and max(
        ids.values()
    ) < config.text_config.vocab_size == len(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.convert_ids_to_tokens(thinker.generation_config.eos_token_id[0]) == "<|im_end|>"
    assert 400 <= len(tok) <= 1024
    for size in (1, 2, 3):
        text = tiny_config(tok, size).text_config
        head_dim = text.hidden_size // text.num_attention_heads
        assert (
            text.hidden_size == 64 * size
            and sum(text.rope_parameters["mrope_section"]) == head_dim // 2
        )
    with pytest.raises(ValueError, match="size must be a positive integer"):
        tiny_config(tok, 0)


def test_larger_size_runs(policy, batch):
    with torch.random.fork_rng(devices=[]):
        thinker = Qwen2_5OmniThinkerForConditionalGeneration(
            tiny_config(policy[1].tokenizer, 2)
        ).eval()
    assert thinker.config.text_config.hidden_size == 128 and num_params(thinker) > 3 * num_params(
        policy[0]
    )
    out = logits(thinker, batch)
    assert (
        out.shape == (*batch["input_ids"].shape, len(policy[1].tokenizer))
        and torch.isfinite(out).all()
    )


def test_tokenizer_encodes_any_text_and_keeps_tags_plain(policy):
    tok = policy[1].tokenizer
    for text in [
        "<think>In the video, the mouth curves up.</think><answer>happy</answer>",
        "Zebra naïve 日本語 😠 \t\n  x",
        "",
    ]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok("<|im_start|>x<|VIDEO|>")["input_ids"], skip_special_tokens=True) == "x"
    # The corpus shapes the vocabulary: a word trained on is one token, unseen it is several.
    assert len(tok.tokenize("zyzzyva")) > 1
    assert len(tiny_processor(["zyzzyva quokka"] * 5).tokenizer.tokenize("zyzzyva")) == 1
    with pytest.raises(ValueError, match="corpus"):
        tiny_processor([])


def test_chat_template_renders_qwen_placeholders(policy):
    text = policy[1].apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>user\n<|vision_bos|><|VIDEO|><|vision_eos|><|audio_bos|><|AUDIO|><|audio_eos|>"
        "What emotion does the person feel? Think, then answer.<|im_end|>\n<|im_start|>assistant\n"
    )
