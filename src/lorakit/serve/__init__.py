"""Serving many adapters on one base: the batching engine (`engine`), the OpenAI-compatible HTTP API
and the playground page (`app`)."""
