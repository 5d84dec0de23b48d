"""One step and the windows of steps: the replica's binding of the job, the update, flat Adam,
replay, windows, the loop skeleton, gathering outputs, SIGTERM."""
