"""minivllm.models"""
