"""model.py: parameter counts, the processor expands video and audio placeholders that the thinker
reads, left-padded batches and generation, and a full Qwen2.5-Omni checkpoint (thinker + talker +
token2wav) loads as its thinker alone (docs/method.md, section 9). Bad model directories are in
test_model_dirs.py."""

import json

import pytest
import torch
from safetensors import safe_open
from thinker_inputs import encode_prompt, logits, random_media
from torch.testing import assert_close
from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration
from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni

from synthetic.tiny import tiny_config
from thinker.model import lm_params, load_policy, num_params, video_kwargs


@pytest.fixture(scope="module")
def policy(tiny_dir):
    thinker, processor = load_policy(tiny_dir)
    return thinker.eval(), processor


@pytest.fixture(scope="module")
def batch(policy):
    return encode_prompt(policy[1], *random_media(0))


def test_param_counts(policy):
    thinker = policy[0]
    assert num_params(thinker) == sum(p.numel() for _, p in thinker.named_parameters())
    naive = sum(
        p.numel()
        for name, p in thinker.named_parameters()
        if name.startswith(("model.language_model.", "lm_head."))
    )
    assert lm_params(thinker) == naive < num_params(thinker)
    # the tiny thinker has 0.47M parameters
    assert 300_000 < num_params(thinker) < 700_000


# processor + forward + generate ------------------------------------------------------------


def test_forward_with_video_audio_text(policy, batch):
    thinker, processor = policy
    ids = batch["input_ids"]
    # 4 frames of 56x56 stay 56x56: grid (2, 4, 4) -> 32 patches -> 8 tokens after the 2x2 merge.
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4]] * 2
    assert batch["pixel_values_videos"].shape == (2 * 32, 3 * 2 * 14 * 14)
    assert batch["input_features"].shape == (2, 32, 200)  # 32 mel bins, 2 s at 100 frames/s
    tok = processor.tokenizer
    for row in ids.tolist():
        assert (
            row.count(thinker.config.video_token_id) == 8
            and row.count(thinker.config.audio_token_id) == 50
        )
        text = tok.decode(row)
        assert "<|vision_bos|>" + "<|VIDEO|>" * 8 + "<|vision_eos|>" in text
        assert "<|audio_bos|>" + "<|AUDIO|>" * 50 + "<|audio_eos|>" in text
    out = logits(thinker, batch)
    assert out.shape == (*ids.shape, len(tok)) and torch.isfinite(out).all()
    # Both towers feed the answer position: other pixels or other sound change its logits.
    videos, audios = random_media(1)
    for new_videos, new_audios in ((videos, random_media(0)[1]), (random_media(0)[0], audios)):
        changed = logits(thinker, encode_prompt(processor, new_videos, new_audios))
        assert not torch.allclose(changed[:, -1], out[:, -1])


def test_video_as_list_of_frames(policy, batch):
    videos, audios = random_media(0)
    frames = []
    for video in videos:
        frames.append([frame.numpy() for frame in video])
    batch2 = encode_prompt(policy[1], frames, audios)
    assert_close(batch2["pixel_values_videos"], batch["pixel_values_videos"], rtol=0, atol=0)


def test_left_padded_batch_matches_single_prompts(policy):
    thinker, processor = policy
    videos, audios = random_media(2)
    audios[1] = audios[1][:20000]  # 1.25 s: fewer audio tokens, so a shorter prompt
    texts = [
        processor.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "video"},
                        {"type": "audio"},
                        {"type": "text", "text": question},
                    ],
                }
            ],
            add_generation_prompt=True,
            tokenize=False,
        )
        for question in ("Why?", "What does the person feel?")
    ]
    padded = processor(
        text=texts,
        videos=videos,
        audio=audios,
        padding=True,
        use_audio_in_video=False,
        videos_kwargs=video_kwargs(processor),
        return_tensors="pt",
    )
    mask = padded["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all()  # left padding, as generate needs
    batched = logits(thinker, padded)[:, -1]
    for i in range(2):
        single = processor(
            text=[texts[i]],
            videos=[videos[i]],
            audio=[audios[i]],
            use_audio_in_video=False,
            videos_kwargs=video_kwargs(processor),
            return_tensors="pt",
        )
        assert_close(logits(thinker, single)[0, -1], batched[i], rtol=1e-5, atol=1e-5)


def test_generate_returns_decodable_ids(policy, batch):
    thinker, processor = policy
    torch.manual_seed(0)
    with torch.no_grad():
        out = thinker.generate(
            **batch, max_new_tokens=16, min_new_tokens=16, do_sample=True, use_audio_in_video=False
        )
    prompt_len = batch["input_ids"].shape[1]
    assert out.shape == (2, prompt_len + 16) and torch.equal(
        out[:, :prompt_len], batch["input_ids"]
    )
    assert int(out.max()) < len(processor.tokenizer)
    texts = processor.batch_decode(out[:, prompt_len:], skip_special_tokens=False)
    assert all(isinstance(t, str) and t for t in texts)
    # Greedy generation is a function of the inputs: its first token is the forward's argmax.
    with torch.no_grad():
        greedy = thinker.generate(
            **batch, max_new_tokens=1, do_sample=False, use_audio_in_video=False
        )
    assert torch.equal(greedy[:, -1], logits(thinker, batch)[:, -1].argmax(-1))


# a full Qwen2.5-Omni checkpoint -----------------------------------------------------------------


def tiny_full_config(thinker_config):
    special = {
        k: getattr(thinker_config, k)
        for k in (
            "audio_token_index",
            "image_token_index",
            "video_token_index",
            "vision_start_token_id",
            "vision_end_token_id",
            "audio_start_token_id",
            "audio_end_token_id",
        )
    }
    talker = dict(
        vocab_size=64,
        embedding_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        tts_text_start_token_id=0,
        tts_text_end_token_id=1,
        tts_text_pad_token_id=2,
        tts_codec_start_token_id=60,
        tts_codec_end_token_id=61,
        tts_codec_pad_token_id=62,
        tts_codec_mask_token_id=63,
        **special,
    )
    token2wav = dict(
        dit_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            head_dim=16,
            emb_dim=16,
            num_embeds=64,
            mel_dim=16,
            enc_emb_dim=16,
            enc_dim=16,
            enc_channels=[16, 16, 16, 16, 48],
            enc_attention_channels=8,
            enc_se_channels=8,
            look_ahead_layers=[1],
            look_backward_layers=[0],
        ),
        bigvgan_config=dict(
            mel_dim=16,
            upsample_initial_channel=32,
            upsample_rates=[2, 2],
            upsample_kernel_sizes=[4, 4],
        ),
    )
    return Qwen2_5OmniConfig(
        thinker_config=thinker_config.to_dict(), talker_config=talker, token2wav_config=token2wav
    )


def test_full_checkpoint_loads_as_thinker_only(policy, batch, tmp_path, monkeypatch):
    processor = policy[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        full = Qwen2_5OmniForConditionalGeneration(
            tiny_full_config(tiny_config(processor.tokenizer))
        ).eval()
    full.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2_5_omni"
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        prefixes = {key.split(".")[0] for key in f.keys()}
    assert prefixes == {"thinker", "talker", "token2wav"}  # the layout of the 3B/7B checkpoints

    def refuse(*args, **kwargs):
        raise AssertionError("load_policy built a talker or token2wav")

    monkeypatch.setattr(
        modeling_qwen2_5_omni.Qwen2_5OmniTalkerForConditionalGeneration, "__init__", refuse
    )
    monkeypatch.setattr(modeling_qwen2_5_omni.Qwen2_5OmniToken2WavModel, "__init__", refuse)
    thinker, processor2 = load_policy(tmp_path)
    assert type(thinker) is modeling_qwen2_5_omni.Qwen2_5OmniThinkerForConditionalGeneration
    assert not any("talker" in name or "token2wav" in name for name, _ in thinker.named_modules())
    expected = full.thinker.state_dict()
    loaded = thinker.state_dict()
    assert loaded.keys() == expected.keys()
    for key in expected:
        assert_close(loaded[key], expected[key], rtol=0, atol=0)
    assert_close(logits(thinker.eval(), batch), logits(full.thinker, batch), rtol=0, atol=0)
    assert processor2.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
