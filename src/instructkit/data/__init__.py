"""The instruction-data pipeline: load records -> validate -> split -> render prompt -> tokenize -> batch.

Each stage is a small pure function in its own module; none of them moves tensors to a device.
"""
