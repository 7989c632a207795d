"""The reference article's run: MNIST at 224x224, SGD lr 0.1, batch 128, 10 epochs."""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'mnist'
  config.image_size = 224
  return config
