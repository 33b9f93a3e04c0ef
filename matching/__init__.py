"""Clause-to-cue matching: the similarity matrices S^m of Eqs. (3) and (9) from an offline
sentence embedding (matcher.py), and the exact token-to-character alignment that turns routed
clauses into evidence tokens (alignment.py)."""
