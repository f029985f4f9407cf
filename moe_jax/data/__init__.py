"""Input pipelines (TFDS) and offline data preparation."""
