"""spinflow: self-play fine-tuning (SPIN) as a reproducible, tracked pipeline."""

__version__ = "0.1.0"
