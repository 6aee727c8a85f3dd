"""instructkit: fine-tune causal language models to follow instructions, then measure them."""
import os

# Intel MKL (torch's CPU BLAS) by default may order a matrix product's sums differently from one
# run to the next (its docs: "Conditional Numerical Reproducibility"), which breaks the promise
# that --seed and --resume reproduce a run bit for bit. Its CNR mode AUTO keeps the fastest code
# path for this processor and makes results repeatable for a fixed thread count (~1% slower on a
# 2048x576x1536 product here). MKL reads the variable at its first product, so this works even
# when torch is imported first; a user's own setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO")

__version__ = "0.1.0"
