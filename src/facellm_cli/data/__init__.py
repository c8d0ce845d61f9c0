"""build-dataset: readers, validation, splits, multiple-choice export and writers."""
