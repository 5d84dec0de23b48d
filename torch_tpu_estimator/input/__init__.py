"""From input_fn to fixed-shape host batches: sources, the pipeline, seeding of random draws by
position, and the streams a checkpoint resumes."""
