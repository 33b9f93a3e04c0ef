"""The Qwen2.5-Omni thinker: inputs in, log-probs out.

model.py loads a thinker and its processor; media.py decodes video and audio files;
batching.py turns records into prompts, processed batches and masked inputs (x\\v, x\\a);
scoring.py runs the towers once per clip and scores completions (log pi(o_t | x, o_<t));
microbatch.py cuts a step's batch into ranges of clips for every pass that scores it.
"""
