"""Default hyperparameters; every other config starts from these.

Each key is documented in the README. Override any of them on the command line
with ``--config.KEY=VALUE``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Data.
  config.dataset = 'fashion_mnist'  # 'mnist' or 'fashion_mnist'
  config.data_source = 'auto'  # 'auto' (local IDX files if found, else tfds), 'idx' or 'tfds'
  config.data_dir = ''  # IDX folder (idx/auto) or tensorflow-datasets data_dir (tfds)
  config.image_size = 96  # images are resized on device to image_size x image_size
  config.train_examples = -1  # first N training examples only; -1 = all
  config.eval_examples = -1  # first N test examples only; -1 = all
  # Model.
  config.aux_weight = 0.0  # > 0 adds GoogLeNet's two auxiliary heads to the training loss
  config.dtype = 'float32'  # compute dtype: 'float32' or 'bfloat16' (params stay float32)
  # Pooling/conv kernels: 'auto' (hand-written on CPU, XLA's stock ops on GPU/TPU), 'xla' or
  # 'custom' (see gnet_jax/ops.py). Same numbers either way; a resume may change it.
  config.kernels = 'auto'
  config.bias_init = 'zeros'  # 'zeros', or 'torch' (uniform +-1/sqrt(fan_in), PyTorch's default)
  # Optimisation (the reference recipe: plain SGD, lr 0.1, batch 128).
  config.optimizer = 'sgd'  # 'sgd' or 'adam'
  config.learning_rate = 0.1
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
