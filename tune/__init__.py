"""Sweep definitions, one file each: `ecar tune NAME` runs tune/NAME.py's SWEEP."""
