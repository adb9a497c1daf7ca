"""The model: smp architectures, heads, encoder names and weights."""
