"""Model FLOPs of the thinker's language model, for the FLOP/s and MFU of every train.py log line
and of tools/bench.py. Counted from the shapes, not measured: the same formula on a CPU and a GPU.
"""

import torch

from thinker import model

# each GPU's dense bf16 FLOP/s and memory bytes/s, from its spec sheet
PEAK = {
    "H100": (989e12, 3.35e12),
    "H200": (989e12, 4.8e12),
    "A100": (312e12, 2.0e12),
}


def lm_flops(
    n_params,
    n_layers,
    d_model,
    trained_tokens,
    scored_tokens,
    seq_len,
    head_params=0,
    trained_rows=0,
    scored_rows=0,
):
    """Model FLOPs of the thinker's LM (PaLM, Chowdhery et al. 2022, app. B; Kaplan et al. 2020,
    table 1):
        6 N + 12 L d T  per trained token (forward 2N + 4LdT, backward twice the forward)
        2 N +  4 L d T  per scored token (a no-grad forward, or one generated token)
        6 H,  2 H       per LM-head row trained, scored (H = vocab x d_model)
    N = the decoder's NON-embedding parameters (lm_shape): the input embedding is a lookup and the
    LM head sees only the rows scoring.lm_head_rows keeps, so it is counted per row. 4LdT is QK^T
    and AV against a T-token context, non-causal as in PaLM's MFU; recomputation is not counted.
    """
    attn = n_layers * d_model * seq_len
    return (
        (6 * n_params + 12 * attn) * trained_tokens
        + (2 * n_params + 4 * attn) * scored_tokens
        + head_params * (6 * trained_rows + 2 * scored_rows)
    )


def lm_shape(policy):
    """(N non-embedding, layers, d_model, LM-head parameters); global sizes under FSDP2 too."""
    text = policy.config.text_config
    embedding = policy.model.language_model.embed_tokens.weight
    head = policy.lm_head.weight
    # a head tied to the embedding holds no parameters of its own
    untied_head = 0 if head is embedding else head.numel()
    non_embedding = model.lm_params(policy) - embedding.numel() - untied_head
    return non_embedding, text.num_hidden_layers, text.hidden_size, head.numel()


def step_flops(policy, rows, prompt_tokens, completion_tokens, scoring_passes=0, generate=True):
    """Model FLOPs of a step: `rows` sequences trained once, scored by `scoring_passes` no-grad
    forwards (reference 1 if beta > 0; the masked ones, in rows scored / rows) and, if `generate`,
    generated; T = the mean length."""
    n, layers, d, head = lm_shape(policy)
    tokens = prompt_tokens + completion_tokens
    head_rows = completion_tokens + rows
    scored_tokens = (scoring_passes + generate) * tokens
    scored_rows = scoring_passes * head_rows + generate * completion_tokens
    mean_length = tokens / rows
    return lm_flops(n, layers, d, tokens, scored_tokens, mean_length, head, head_rows, scored_rows)


def peak(i=0):
    """This CUDA device's PEAK: i=0 dense bf16 FLOP/s, 1 memory bytes/s; None if unknown or none."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for gpu, values in PEAK.items():
        if gpu in name:
            return values[i]
    return None
