"""Vocab-parallel (tensor-parallel) losses over Megatron's sharded logits."""
