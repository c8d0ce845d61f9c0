"""Talking to OpenAI-compatible chat endpoints: one client for annotate, evaluate and ``ask --base-url``.

``client`` holds :class:`~.client.ChatClient` (retries, Retry-After, 429 pause,
fatal 401/403/404, rpm cap, streaming) and ``messages`` the request builders
(``chat_messages``, ``is_local_endpoint``). Settings come from
:class:`facellm_cli.config.EndpointConfig`. This package imports nothing heavy;
``openai`` is imported when a client is made.
"""
