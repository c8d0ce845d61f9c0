"""The three ways an annotate run fills its output, each a module exposing ``run(run)``.

``template`` answers from labels alone (offline), ``live`` asks an endpoint
request by request, ``batch`` goes through the OpenAI Batch API.
"""
