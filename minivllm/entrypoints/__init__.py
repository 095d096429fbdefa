"""minivllm.entrypoints"""
