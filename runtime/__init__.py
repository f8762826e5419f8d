"""What a run needs around the training: settings, checkpoints, the output directory, stopping, rendezvous,
MPI endings, errors."""
