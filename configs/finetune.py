"""Fine-tune torchvision's ImageNet GoogLeNet on your own images.

``python train.py --config configs/finetune.py --config.data_dir=DIR
--config.init_from=~/.cache/torch/hub/checkpoints/googlenet-1378be20.pth``
(``DIR/train/<class>/``, ``DIR/test/<class>/``). The network and its input
are what the ImageNet weights were trained with: ``inception_v1`` at 224x224,
ImageNet's mean and std, and ``transform_input`` (torchvision's pretrained
GoogLeNet turns on its ported-from-TensorFlow input range); the classifier is
new for your classes and the rest comes from the file.

The recipe: Adam at 1e-3 (decoupled weight decay 1e-4) with warmup and
cosine decay, the pretrained blocks at a tenth of the classifier's rate,
BatchNorm statistics updating, no aux heads (torchvision's are not
pretrained), random-resized crops and flips against overfitting a few hundred
images. Measured on what this machine has (no ImageNet file can be downloaded
here): a network pretrained on five Fashion-MNIST classes, fine-tuned for 60
steps on 100 images of the other five (``python -m benchmarks.transfer``,
docs/finetune.md). There this recipe ended at 0.73-0.74 test accuracy; SGD
at 0.01 at 0.67, and 0.53-0.66 with the BatchNorm statistics frozen (common
with ImageNet weights and small batches); the pretrained blocks at the full
rate 0.66-0.75. That source is far weaker than ImageNet: with the real file,
compare on your own data with ``--config.bn_stats=frozen`` and with training
from scratch (``configs/image_folder.py --config.model=inception_v1``).
"""

from configs import image_folder


def get_config():
  # configs/image_folder.py's recipe for a small folder (Adam 1e-3, weight decay 1e-4,
  # warmup + cosine, flips, batch 32), on torchvision's network at ImageNet's input.
  config = image_folder.get_config()
  config.model = 'inception_v1'
  config.image_size = 224
  config.transform_input = True
  config.normalize_stats = 'imagenet'
  config.init_from = ''  # the ImageNet .pth file (or a workdir); empty trains from scratch
  config.trainable = 'all'  # 'head' trains the classifier alone; 'inception5a' the last blocks
  config.pretrained_lr_multiplier = 0.1
  config.bn_stats = 'update'
  config.augment_crop = 'resized'
  config.num_epochs = 10
  return config
