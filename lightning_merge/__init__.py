"""lightning_merge: merge separately trained networks into one model, as a PyTorch Lightning plugin."""

__version__ = "0.1.0"
