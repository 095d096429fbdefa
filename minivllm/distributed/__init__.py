"""minivllm.distributed"""
