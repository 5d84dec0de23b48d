"""Export for serving and serving it: tracing and lowering, the signature, the StableHLO
bundle read without unpickling, load_exported, the TF SavedModel variant."""
