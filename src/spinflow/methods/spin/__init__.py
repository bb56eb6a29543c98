"""SPIN: self-play fine-tuning (arXiv 2401.01335) and the continued-SFT baselines it is judged against."""
