"""``facellm serve``: an OpenAI-compatible chat completions server with dynamic batching.

Modules: ``app.py`` (HTTP layer: ``create_app``, ``serve_forever``, ``background_server``),
``batcher.py`` (the worker thread that owns the model), ``protocol.py`` (request and
response shapes), ``messages.py`` (messages and images -> prompt), ``logs.py`` (request
log lines). fastapi and uvicorn (the ``serve`` extra) are imported only inside ``app.py``
functions.

Behaviour, in short (details in each module's docstring):

- Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/models/{id}``,
  ``GET /health`` (no key needed; includes batcher counters: batches, batch sizes,
  cancellations, queue length).
- Model names: one model per server. Any ``model`` value in a request is accepted and
  served by it (so clients configured with another name still work); responses and
  ``/v1/models`` report ``served_model_name`` or the model folder name.
- Batching: concurrent requests with compatible sampling settings share one
  ``generate_batch`` call (greedy with greedy; sampled by equal temperature/top_p;
  seeded sampling alone). Streaming requests are batched like the others; their text
  is streamed per row as it is generated.
- Stop strings end a row early (not only by truncating afterwards); ``max_tokens`` is
  per row; a client that disconnects is dropped from the queue or its row is stopped.
- ``response_format`` json_object / json_schema: the schema is checked structurally and
  given to the model as an instruction; decoding is NOT constrained, so the reply can
  still be invalid JSON (non-streamed replies are trimmed to the outermost ``{...}``
  when that parses).
- Omitted ``temperature`` means the server default (greedy), not OpenAI's 1.0.
- Safety: 127.0.0.1 by default; optional bearer key (constant-time compare, never
  logged); 413 for bodies and decoded images over the limits; 400 for too many images,
  bad base64, non-JPEG/PNG/WebP data, unknown fields, unsupported options and prompts
  longer than the model's context, all as OpenAI error JSON; remote image URLs only with ``--allow-remote-images``.
"""
