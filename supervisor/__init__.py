"""The multi-process supervisor (arbiter): forks and watches relay workers."""
