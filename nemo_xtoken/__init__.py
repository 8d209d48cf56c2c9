"""nemo_xtoken: cross-tokenizer knowledge distillation (X-Token) for NVIDIA's training stack.

Layers (dependencies point down only): ``vocab`` → ``align`` → ``losses`` → ``parallel`` →
``integration`` → ``cli``.  Everything below ``integration`` runs on a CPU.
"""

__version__ = "0.1.0"
