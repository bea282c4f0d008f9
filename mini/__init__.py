"""Mini demo data: a synthetic shapes dataset (shapes.py) and its deterministic analyser (analyser.py)."""
