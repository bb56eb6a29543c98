"""AutoIF: instructions with verification code, execution feedback, online DPO (arXiv 2406.13542)."""
