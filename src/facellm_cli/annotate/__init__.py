"""``facellm annotate``: weak supervision of face images with a VLM endpoint (the FairFaceGPT pipeline).

``prompts`` holds versioned prompt sets, ``labels`` reads label files, ``store``
reads and appends the output, ``run`` plans a run, ``strategies`` fill it
(``template`` from labels alone, ``live`` request by request, ``batch`` through
the Batch API), ``pricing`` estimates cost and ``pipeline`` ties them together.
Endpoints are reached through :mod:`facellm_cli.endpoint`. Import submodules
directly; this package imports nothing heavy.
"""
