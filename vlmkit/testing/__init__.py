"""Helpers for plugin authors: tiny checkpoints of real architectures and the plugin contract suite."""
