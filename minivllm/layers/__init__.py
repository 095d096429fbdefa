"""minivllm.layers"""
