"""minivllm.entrypoints.openai"""
