"""Data preparation: the corpus reader and shard writer, the tokenizers, the shard and Megatron formats, and
opening them for training (windows.py)."""
