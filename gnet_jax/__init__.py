"""gnet-jax: the d2l GoogLeNet in JAX/Flax, with a trainer, checkpoints and PyTorch interop."""

__version__ = '0.1.0'
