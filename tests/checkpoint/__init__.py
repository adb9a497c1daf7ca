"""Checkpoint, resume and preemption tests."""
