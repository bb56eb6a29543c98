"""LoBaSS: fine-tune on the SFT examples the model learns most from (arXiv 2310.13008)."""
