"""What a user writes against: the configs, model_fn's spec and argument binding, the hook
protocol, metrics, data helpers, LR schedules, and the Job that carries them to replicas."""
