"""Configuration: the schema with defaults and ranges, YAML + overrides, recorded configs."""
