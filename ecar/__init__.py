"""ecar: E-CAR image generators trained and sampled at scale on Ray."""

__version__ = "0.1.0"
