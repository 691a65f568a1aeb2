"""Environments for multi-turn agents: gym-style `reset()/step()` text environments and TRL's tool form."""
