"""``facellm serve``: an OpenAI-compatible chat completions server with dynamic batching.

``app.py`` (HTTP layer), ``batcher.py`` (batching worker), ``protocol.py`` (request and
response shapes), ``messages.py`` (messages and images -> prompt), ``logs.py`` (request logs).
fastapi and uvicorn are imported only inside ``app.py`` functions.
"""
