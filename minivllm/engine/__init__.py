"""minivllm.engine"""
