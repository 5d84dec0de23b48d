"""Helpers every stage uses: maps over nested tensors, names read from disk kept inside their
folder, the library logger."""
