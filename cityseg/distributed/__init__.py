"""Processes: the accelerator, stop signals and the vote, the run lock, the network interface."""
