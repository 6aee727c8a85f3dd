"""Dataset tools: near-duplicates (dedup.py), train/test leakage (leakage.py) and new instruction
data generated with a served model (synth.py), over one similarity module (similarity.py)."""
