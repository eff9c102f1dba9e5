"""rollout_sleep: a vLLM generator and a PyTorch trainer on the same GPUs, alternating."""

__version__ = "0.1.0"
