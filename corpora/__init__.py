"""From a corpus to manifest records: one manifest line parsed and checked (records.py) and the
cues decomposed from a reference reasoning (decompose.py)."""
