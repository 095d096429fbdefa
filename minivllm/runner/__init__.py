"""minivllm.runner"""
