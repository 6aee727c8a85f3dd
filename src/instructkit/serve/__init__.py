"""Talking to a model: an OpenAI-compatible server with a chat page (app.py), the worker that
batches concurrent requests through one model (worker.py), and a terminal chat (chat.py)."""
