"""A fixed prompt and random clips processed for the tiny thinker, and its logits: the inputs that
test_model.py and test_tiny.py feed the thinker."""

import numpy as np
import torch

from thinker.model import video_kwargs

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


def random_media(seed, n=2):
    """n random videos (4, 56, 56, 3) uint8 and n noise waveforms of 2 s at 16 kHz."""
    g = np.random.default_rng(seed)
    videos = []
    for _ in range(n):
        videos.append(torch.from_numpy(g.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8)))
    audios = []
    for _ in range(n):
        audios.append((0.1 * g.standard_normal(32000)).astype(np.float32))
    return videos, audios


def encode_prompt(processor, videos, audios):
    text = processor.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    return processor(
        text=[text] * len(videos),
        videos=videos,
        audio=audios,
        use_audio_in_video=False,
        videos_kwargs=video_kwargs(processor),
        return_tensors="pt",
    )


def logits(thinker, batch):
    with torch.no_grad():
        return thinker(**batch).logits
