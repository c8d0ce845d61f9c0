"""``facellm evaluate``: multiple-choice evaluation (FaceXBench, build-dataset exports, user sets)."""
