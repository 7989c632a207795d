"""Fashion-MNIST at its native 28x28, sized to learn something real in minutes on a laptop CPU.

The reference recipe (plain SGD 0.1, Xavier, no normalisation) barely moves in
its first epoch at 28x28, so this config changes the recipe: SGD with Nesterov
momentum 0.9 at a lower learning rate, and GoogLeNet's auxiliary heads, whose
short gradient paths get the early layers going.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'fashion_mnist'
  config.image_size = 28
  config.learning_rate = 0.02
  config.momentum = 0.9
  config.nesterov = True
  config.aux_weight = 0.3
  config.num_epochs = 2
  return config
