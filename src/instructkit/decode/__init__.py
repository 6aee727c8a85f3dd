"""Decoding: everything between a loaded model and the tokens it writes.

- load.py: the one loader every command that talks to a model calls (spec -> model, tokenizer,
  prompt style; device, precision, quantization and the compiled step applied).
- generate.py: the KV-cache engine (a generator of tokens; batching, sampling, stop rules).
- beam.py: beam search on the same engine.
- static_decode.py: `--compile`, the decode step as one static-shape graph; background.py: that
  step compiled in a thread while the eager path answers (chat's and serve's default);
  compile_cache.py: where the compiled code is kept between starts.
- quantize.py, native.py, vocabulary.py, csrc/: low-precision decoding weights and the C++ kernels
  behind them, and block-wise argmax / top-k over the vocabulary.
"""
