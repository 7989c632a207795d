"""Your own images: ``--config.data_dir=DIR`` with ``DIR/train/<class>/`` and ``DIR/test/<class>/``.

A recipe for small data sets trained from scratch (hundreds of images per
class), at 64x64 to keep a CPU run short. The book's plain SGD at 0.1 barely
leaves this network's initial plateau in the few hundred steps such a set
gives, so: Adam at 1e-3 with one epoch of linear warmup and cosine decay to 0,
decoupled weight decay 1e-4, per-channel normalisation, and pad-crop and flip
augmentation against overfitting a small set. Measured on a 1,000-image,
10-class folder made from Fashion-MNIST (``python -m
benchmarks.own_data_recipes``): table and reasons in docs/own_data.md.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'image_folder'
  config.data_dir = ''  # required: --config.data_dir=DIR
  config.image_size = 64
  config.normalize = True
  config.augment_crop = 'pad'
  config.augment_padding = 4
  config.augment_flip = True
  config.optimizer = 'adam'
  config.learning_rate = 1e-3
  config.weight_decay = 1e-4
  config.lr_schedule = 'warmup_cosine'
  config.warmup_epochs = 1.0
  config.batch_size = 32
  config.num_epochs = 30
  return config
