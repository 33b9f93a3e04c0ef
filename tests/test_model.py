"""Tests for model.py (SPEC section 9): the tiny thinker and processor round-trip through
save_pretrained / load_policy exactly, a full Qwen2.5-Omni checkpoint (thinker + talker +
token2wav) loads as its thinker alone, the processor expands video and audio placeholders that
the model reads, and bad model directories fail with errors that name the path."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.testing import assert_close
from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration
from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni

import model
from model import (
    NAMED_TOKENS,
    ModelDirError,
    build_tiny,
    lm_params,
    load_policy,
    num_params,
    tiny_config,
    tiny_processor,
    video_kwargs,
)

PROMPT = [
    {
        "role": "user",
        "content": [
            {"type": "video"},
            {"type": "audio"},
            {"type": "text", "text": "What emotion does the person feel? Think, then answer."},
        ],
    }
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny") / "tiny", seed=0)


@pytest.fixture(scope="module")
def policy(tiny_dir):
    thinker, processor = load_policy(tiny_dir)
    return thinker.eval(), processor


def media(seed, n=2):
    g = np.random.default_rng(seed)
    videos = [
        torch.from_numpy(g.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8)) for _ in range(n)
    ]
    audios = [
        (0.1 * g.standard_normal(32000)).astype(np.float32) for _ in range(n)
    ]  # 2 s at 16 kHz
    return videos, audios


def encode(processor, videos, audios):
    text = processor.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    return processor(
        text=[text] * len(videos),
        videos=videos,
        audio=audios,
        use_audio_in_video=False,
        videos_kwargs=video_kwargs(processor),
        return_tensors="pt",
    )


@pytest.fixture(scope="module")
def batch(policy):
    return encode(policy[1], *media(0))


def logits(thinker, batch):
    with torch.no_grad():
        return thinker(**batch).logits


# build_tiny -> save_pretrained -> load_policy ------------------------------------------------


def test_round_trip_gives_identical_logits(policy, batch, tmp_path):
    thinker, processor = policy
    # The same construction as build_tiny, in memory: the saved weights are the built ones.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = model.Qwen2_5OmniThinkerForConditionalGeneration(
            tiny_config(processor.tokenizer)
        ).eval()
    assert_close(logits(thinker, batch), logits(reference, batch), rtol=0, atol=0)
    # And a second save/load of the loaded policy changes nothing, processor included.
    thinker.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    thinker2, processor2 = load_policy(tmp_path)
    batch2 = encode(processor2, *media(0))
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
        thinker = model.Qwen2_5OmniThinkerForConditionalGeneration(
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


def test_param_counts(policy):
    thinker = policy[0]
    assert num_params(thinker) == sum(p.numel() for _, p in thinker.named_parameters())
    naive = sum(
        p.numel()
        for name, p in thinker.named_parameters()
        if name.startswith(("model.language_model.", "lm_head."))
    )
    assert lm_params(thinker) == naive < num_params(thinker)
    assert 300_000 < num_params(thinker) < 700_000  # the 0.47M size of SYNTH_NOTES


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
    videos, audios = media(1)
    for new_videos, new_audios in ((videos, media(0)[1]), (media(0)[0], audios)):
        changed = logits(thinker, encode(processor, new_videos, new_audios))
        assert not torch.allclose(changed[:, -1], out[:, -1])


def test_video_as_list_of_frames(policy, batch):
    videos, audios = media(0)
    frames = [[frame.numpy() for frame in video] for video in videos]
    batch2 = encode(policy[1], frames, audios)
    assert_close(batch2["pixel_values_videos"], batch["pixel_values_videos"], rtol=0, atol=0)


def test_left_padded_batch_matches_single_prompts(policy):
    thinker, processor = policy
    videos, audios = media(2)
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
