"""Self-supervised rotation pretraining on Tiny ImageNet, then fish-vs-duck transfer."""

__version__ = "0.1.0"
