"""Measurement tools: throughput bench, stop-vote bench, the GPU proof and its diagnosis."""
