"""What a run needs around the training: checkpoints, the output directory, stopping, rendezvous, MPI endings,
errors."""
