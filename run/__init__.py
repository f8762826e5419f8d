"""What a run needs around the model: its settings (config.py) and checkpoints (checkpoint.py)."""
