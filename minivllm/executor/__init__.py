"""Executors: how the engine core runs a step on one or more model workers."""
