"""What a run shows: TensorBoard summaries, progress, and the record of how the run began."""
