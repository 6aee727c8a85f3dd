"""Model families, checkpoint loading and tokenizers."""
