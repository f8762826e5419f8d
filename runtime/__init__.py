"""The layers: see README.md's file table. The ground floor: errors, MPI endings, collectives with a deadline,
rendezvous, start-up, stopping, the output directory, the accelerators' table."""
