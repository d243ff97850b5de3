"""Sweep definitions, one file each: `ecar tune NAME` runs NAME.py's SWEEP."""
