"""SFT: θ0, the base model fine-tuned on the SFT split (arXiv 2401.01335 starts from it)."""
