"""instructkit: fine-tune causal language models to follow instructions, then measure them."""
__version__ = "0.1.0"
