"""Checkpoint converters: turn remote-code checkpoints into transformers-native ones.

Native models load with plain `from_pretrained` (no `trust_remote_code`), so every
later stage (pruning, recovery, evaluation) can treat all models alike.
"""
