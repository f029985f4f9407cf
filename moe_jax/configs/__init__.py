"""Config building blocks shared by the files in configs/ (ml_collections)."""
