"""From a corpus to manifest records: converters of the public corpora's layouts (mafw.py,
dfew.py, mer.py, emer.py, sharing convert.py), label spaces (labels.py), one manifest line parsed
and checked (records.py) and the cues decomposed from a reference reasoning (decompose.py)."""
