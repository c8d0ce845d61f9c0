"""``facellm annotate``: weak supervision of face images with a VLM endpoint (the FairFaceGPT pipeline).

``prompts`` holds versioned prompt sets, ``labels`` reads label files, ``client``
talks to OpenAI-compatible endpoints, ``pipeline`` runs a resumable job,
``batch`` does the same through the Batch API and ``template`` answers from
labels alone. Import submodules directly; this package imports nothing heavy.
"""
