"""moelocal: plan and run quantized Mixture-of-Experts GGUF models on your own machine."""

__version__ = "0.1.0"
