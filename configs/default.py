"""Default hyperparameters; every other config starts from these.

Each key is documented in the README. Override any of them on the command line
with ``--config.KEY=VALUE``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Data.
  # 'mnist', 'fashion_mnist', 'image_folder' (data_dir/train/<class>/, data_dir/test/<class>/)
  # or, with data_source='tfds', any tensorflow-datasets image classification set.
  config.dataset = 'fashion_mnist'
  config.data_source = 'auto'  # 'auto' (local IDX files if found, else tfds), 'idx' or 'tfds'
  config.data_dir = ''  # IDX folder, image folder, or tensorflow-datasets data_dir (tfds)
  # 'memory' (decode the whole set first; fastest for the MNIST family), 'stream' (read with
  # Grain while training: image folders and tfds sets larger than memory) or 'auto' (stream
  # when the decoded set would not fit in memory). See docs/streaming.md.
  config.input = 'auto'
  config.data_workers = 0  # stream: Grain worker processes decoding (0 = threads in this one)
  # stream, image folders: decode each split once into a file of pixels (the decoded size, on
  # disk beside the memory path's decode cache) and stream from it instead of the JPEGs.
  config.stream_cache = False
  config.train_split = 'train'  # tensorflow-datasets split names (slices like 'train[:90%]' work)
  config.test_split = 'test'
  config.image_size = 96  # images are resized on device to image_size x image_size
  config.train_examples = -1  # first N training examples only; -1 = all
  config.eval_examples = -1  # first N test examples only; -1 = all
  # Per-channel mean/std of the training images, subtracted and divided by; saved with the
  # checkpoint. Off in the book's recipe, which feeds [0, 1].
  config.normalize = False
  # The statistics normalize uses: 'training_set' (the training images') or 'imagenet'
  # (ImageNet's RGB mean and std, which pretrained ImageNet weights expect).
  config.normalize_stats = 'training_set'
  # Augmentation on device, off in the book's recipe: crop 'none', 'pad' (zero-pad by
  # augment_padding, crop back at a random place) or 'resized' (random-resized crop).
  config.augment_crop = 'none'
  config.augment_padding = 4
  config.augment_flip = False  # random horizontal flips
  # Model.
  # 'd2l' (the book's GoogLeNet, gnet_jax/models.py) or 'inception_v1' (torchvision's
  # GoogLeNet with BatchNorm, gnet_jax/inception_v1.py: the one ImageNet weights fit).
  config.model = 'd2l'
  # inception_v1: turn ImageNet-normalised input into (x - 0.5) / 0.5, as torchvision's
  # pretrained GoogLeNet does (its weights were ported from TensorFlow).
  config.transform_input = False
  # Fine-tuning (see configs/finetune.py). init_from: a torchvision GoogLeNet state dict
  # (.pth) or a gnet-jax workdir whose weights start the run ('' = the seed's initialisation).
  config.init_from = ''
  # Which parameters train: 'all', 'head' (the classifier and aux heads) or a block name
  # (e.g. 'inception5a': it, every later block and the heads); the rest stay bit for bit.
  config.trainable = 'all'
  config.pretrained_lr_multiplier = 1.0  # learning rate factor of the trained non-head blocks
  # inception_v1's BatchNorm in training: 'update' (batch statistics, running averages
  # updated) or 'frozen' (running statistics, never updated); frozen blocks' are always frozen.
  config.bn_stats = 'update'
  config.aux_weight = 0.0  # > 0 adds GoogLeNet's two auxiliary heads to the training loss
  config.dtype = 'float32'  # compute dtype: 'float32' or 'bfloat16' (params stay float32)
  # Pooling/conv kernels: 'auto' (hand-written on CPU, XLA's stock ops on GPU/TPU), 'xla' or
  # 'custom' (see gnet_jax/ops.py). Same numbers either way; a resume may change it.
  config.kernels = 'auto'
  config.bias_init = 'zeros'  # 'zeros', or 'torch' (uniform +-1/sqrt(fan_in), PyTorch's default)
  # Optimisation (the reference recipe: plain SGD, lr 0.1, batch 128).
  config.optimizer = 'sgd'  # 'sgd' or 'adam'
  config.learning_rate = 0.1
  # 'constant' (the book's), 'warmup_cosine' (linear warmup over warmup_epochs, then cosine
  # decay to 0 at the last step) or 'step' (times lr_decay_factor every lr_decay_epochs).
  config.lr_schedule = 'constant'
  config.warmup_epochs = 0.0
  config.lr_decay_epochs = 30
  config.lr_decay_factor = 0.1
  config.weight_decay = 0.0  # sgd: added to the gradient (L2); adam: decoupled (AdamW)
  config.momentum = 0.0  # sgd only
  config.nesterov = False  # sgd only
  config.batch_size = 128  # global batch, split across devices and processes
  config.eval_batch_size = 0  # 0 = batch_size
  config.num_epochs = 10
  config.seed = 0
  # Devices and hosts.
  config.parallelism = 'auto'  # 'auto', 'none', 'pmap' or 'sharded'
  config.num_devices = 0  # devices to use, 0 = all (a multiple of the process count)
  config.distributed = False  # call jax.distributed.initialize() (multi-host)
  config.coordinator_address = ''  # host:port; empty = let JAX detect the cluster
  config.num_processes = 1
  config.process_id = 0
  # Checkpoints (in <workdir>/checkpoints; rerunning with the same workdir resumes).
  config.checkpoint_every_steps = 0  # also save every N steps; 0 = only at each epoch's end
  config.max_checkpoints = 3  # keep the newest N checkpoints; 0 = keep all
  # Output.
  config.progress = True  # tqdm bar within an epoch (only on a terminal)
  # Training loss/accuracy every N steps (steps.jsonl, TensorBoard, curves.png);
  # -1 = about 5 points per epoch, 0 = only at epoch ends.
  config.log_every_steps = -1
  config.profile_steps = 0  # > 0: a jax.profiler trace of that many steps (after warm-up)
  # Persistent XLA compilation cache, so a second run starts in seconds: 'auto' (a
  # per-user folder, ~/.cache/gnet_jax/xla), a folder, or 'off'. The environment
  # variable JAX_COMPILATION_CACHE_DIR, when set, wins.
  config.compilation_cache = 'auto'
  return config
