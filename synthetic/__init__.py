"""The built-in known-truth world and the tiny thinker: what `python train.py` trains on without
--data and --model. world.py generates the clips (plan.py decides what each shows and says,
render.py draws faces and synthesises voices); tiny.py builds a random-weight Qwen2.5-Omni
thinker offline. Loaded only to build these defaults, never by a run on real data."""
