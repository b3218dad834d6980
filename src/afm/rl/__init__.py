"""Reinforcement learning on verifiable rewards (GRPO over environments) and preference optimisation (DPO)."""
