"""Training and inference throughput: gnet-jax next to the PyTorch original, and its variants.

    python -m benchmarks.throughput                          # sizes 28 and 96, batch 128
    python -m benchmarks.throughput --sizes 224 --json out.json
    python -m benchmarks.throughput --sizes 96 --no-torch --ops-at c638eba   # kernels of a revision
    python -m benchmarks.throughput --sizes 96 --tasks train --no-torch --jax-variants sweep
    python -m benchmarks.throughput --model inception_v1 --sizes 224 --batch 16   # torchvision's

Every variant runs in its own worker process (``benchmarks.harness``), so its
``XLA_FLAGS``, threads, allocator and peak memory are its own: gnet-jax as
``train.py`` runs it and changed in one thing each (kernels, XLA flags, the
heap trim, malloc settings, the batch split, ``gnet_jax/ops.py`` as committed
at ``--ops-at REV``), and the PyTorch original (``gnet_jax/torch_reference.py``)
in both memory layouts. ``--model inception_v1`` trains torchvision's GoogLeNet
(BatchNorm; 3 channels, 1,000 classes, aux heads on by default as
``torchvision.models.googlenet()`` builds it) on both sides instead. The
parent alternates the workers step by step (train, then eval), round after
round, until every ratio varies by at most ``--spread`` over rounds, and
reports img/s and each ratio as the median with its range. Ratios are to the
faster PyTorch layout, or without PyTorch to the first gnet-jax column
(``--ops-at`` puts the revision's column first).

Runs on whatever JAX sees (CPU, GPU or TPU); PyTorch runs on the matching
device when it has one (CUDA), else its columns are left out.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from benchmarks import harness

YNN = '--xla_cpu_experimental_ynn_fusion_type='


@dataclasses.dataclass(frozen=True)
class Variant:
  """One column: a worker factory, its arguments and environment, its batch (None: --batch)."""
  factory: str
  kwargs: dict = dataclasses.field(default_factory=dict)
  env: dict = dataclasses.field(default_factory=dict)
  xla_flags: str = ''
  batch: int | None = None


def jax_variant(xla_flags: str = '', batch: int | None = None, env: dict | None = None,
                **kwargs) -> Variant:
  return Variant('benchmarks.throughput:JaxSide', kwargs, env or {}, xla_flags, batch)


# 'gnet-jax' is what train.py runs (kernels=auto, gnet_jax.xla_flags' defaults, the heap
# trim after compiling); each other changes one thing.
JAX_VARIANTS = {
    'gnet-jax': jax_variant(),
    'gnet-jax kernels=xla': jax_variant(kernels='xla'),
    'gnet-jax kernels=custom': jax_variant(kernels='custom'),
    'gnet-jax XLA defaults': jax_variant(env={'GNET_JAX_XLA_DEFAULTS': '0'}),
    # glibc malloc without mmap for big blocks; read at process start, so only a launcher
    # can set them.
    'gnet-jax + malloc env': jax_variant(env={'MALLOC_MMAP_MAX_': '0',
                                              'MALLOC_TRIM_THRESHOLD_': '68719476736'}),
    'gnet-jax no heap trim': jax_variant(trim=False),
}
# XLA:CPU's library paths and the batch split (--jax-variants sweep): the flags are added to
# XLA_FLAGS; where a variant names the YNN flag it replaces gnet-jax's default for it.
SWEEP = {
    'YNNPACK dots only': jax_variant(YNN + 'individual_dot'),
    'YNNPACK convolutions only': jax_variant(YNN + 'individual_convolution'),
    'YNNPACK dots and convolutions': jax_variant(YNN + 'individual_dot,individual_convolution'),
    'YNNPACK dot fusions': jax_variant(YNN + 'dot'),
    'YNNPACK elementwise + reduce fusions': jax_variant(YNN + 'eltwise,reduce'),
    'XNNPACK dot fusions': jax_variant('--xla_cpu_experimental_xnn_fusion_type=dot'),
    'oneDNN dot fusions': jax_variant(
        '--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot'),
    'oneDNN custom calls': jax_variant(
        '--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true'),
    'XNNPACK off': jax_variant('--xla_cpu_use_xnnpack=false'),
    'old fusion emitters': jax_variant('--xla_cpu_use_fusion_emitters=false'),
    'batch split: 64 per step': jax_variant(batch=64),
    'batch split: 32 per step': jax_variant(batch=32),
}
DEFAULT_CPU_VARIANTS = ('gnet-jax', 'gnet-jax kernels=xla')
DEFAULT_ACCEL_VARIANTS = ('gnet-jax', 'gnet-jax kernels=custom')
# The PyTorch original as its DataLoader delivers (contiguous NCHW, the seed as written) and
# in channels_last (PyTorch's faster CPU path).
TORCH_VARIANTS = {'PyTorch NCHW (as written)': Variant('benchmarks.throughput:TorchSide',
                                                       {'layout': 'nchw'}),
                  'PyTorch channels_last': Variant('benchmarks.throughput:TorchSide',
                                                   {'layout': 'channels_last'})}


# ----------------------------------------------------------------------------- workers


class JaxSide:
  """A worker: gnet-jax's compiled train and eval steps on one random batch."""

  def __init__(self, size: int, batch: int, kernels: str = 'auto', ops_at: str | None = None,
               trim: bool = True, flops: bool = False, model: str = 'd2l',
               aux_weight: float = 0.0):
    from gnet_jax import xla_flags
    xla_flags.apply_defaults()  # before JAX starts, as train.py does
    import jax

    t0 = time.perf_counter()
    config = harness.gnet_config(size, batch, kernels=kernels, model=model, aux_weight=aux_weight)
    self.steps = harness.JaxSteps.build(config, ops=harness.ops_at(ops_at) if ops_at else None)
    self.state = self.steps.state()
    self.data, self.eval_data = self.steps.batch(), self.steps.batch(eval_mask=True)
    init_s = time.perf_counter() - t0
    self.train_step, train_s = self.steps.compile(None, self.state, self.data)
    self.eval_step, eval_s = self.steps.compile(self.steps.eval_fn, self.state.variables,
                                                self.eval_data)
    if trim:
      xla_flags.return_freed_memory()  # as train.py does once its steps are compiled
    self.jax, self.device = jax, self.steps.runner.devices[0]
    self._info = {'init_s': init_s, 'compile_s': train_s + eval_s,
                  'device': f'{self.device.platform}:{self.device.device_kind}',
                  'xla_flags': os.environ.get('XLA_FLAGS', ''),
                  'flops': harness.model_flops(size, model) if flops else None}

  def info(self, _: dict) -> dict:
    return self._info

  def train(self, req: dict) -> dict:
    return {'times': [self._timed(lambda: self._train()) for _ in range(req['count'])]}

  def _train(self):
    self.state = self.train_step(self.state, self.data)
    return self.state

  def eval(self, req: dict) -> dict:
    return {'times': [self._timed(lambda: self.eval_step(self.state.variables, self.eval_data))
                      for _ in range(req['count'])]}

  def _timed(self, fn) -> float:
    t0 = time.perf_counter()
    self.jax.block_until_ready(fn())
    return time.perf_counter() - t0

  def finish(self, _: dict) -> dict:
    stats = self.device.memory_stats() or {} if self.device.platform != 'cpu' else {}
    return {'peak_rss': harness.peak_rss_bytes(), 'device_peak': stats.get('peak_bytes_in_use')}


class TorchSide:
  """A worker: the PyTorch original's train step (SGD) and eval on the same random batch.

  ``dtype='bfloat16'``: the forward pass under autocast; ``compile_mode``: the
  network through ``torch.compile`` ('default' or e.g. 'max-autotune').
  ``model='inception_v1'``: torchvision's GoogLeNet (``init_weights=True``), its
  aux heads built and trained (loss + ``aux_weight`` x each) when ``aux_weight`` > 0.
  """

  def __init__(self, size: int, batch: int, layout: str = 'nchw', device: str = 'cpu',
               dtype: str = 'float32', compile_mode: str | None = None, model: str = 'd2l',
               aux_weight: float = 0.0):
    import torch
    from torch.nn import functional as F

    from gnet_jax.torch_reference import googlenet
    t0 = time.perf_counter()
    self.torch, self.F, self.device = torch, F, torch.device(device)
    torch.manual_seed(0)
    memory_format = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
    if model == 'inception_v1':
      from gnet_jax.torch_reference import torchvision_models
      net, channels = torchvision_models().googlenet(
          weights=None, aux_logits=aux_weight > 0, init_weights=True), 3
    else:
      net, channels = googlenet(), 1
    self.aux_weight = aux_weight
    self.net = net.to(self.device, memory_format=memory_format)
    self.optimizer = torch.optim.SGD(self.net.parameters(), lr=0.1)
    if compile_mode:
      self.net = torch.compile(self.net, mode=None if compile_mode == 'default' else compile_mode,
                               dynamic=False)
    self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                   enabled=dtype == 'bfloat16')
    images, labels = harness.random_batch(batch, size, channels=channels)
    self.x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).to(
        self.device).contiguous(memory_format=memory_format)
    self.y = torch.from_numpy(labels).long().to(self.device)
    cuda = self.device.type == 'cuda'
    self.sync = torch.cuda.synchronize if cuda else (lambda: None)
    self._info = {'init_s': time.perf_counter() - t0, 'compile_s': None,
                  'device': f"{self.device.type}:{torch.cuda.get_device_name() if cuda else 'cpu'}",
                  'threads': torch.get_num_threads()}

  def info(self, _: dict) -> dict:
    return self._info

  def train(self, req: dict) -> dict:
    def step():
      self.net.train()
      self.optimizer.zero_grad(set_to_none=True)
      with self.autocast:
        out = self.net(self.x)
        if isinstance(out, tuple):  # torchvision's GoogLeNetOutputs(logits, aux2, aux1)
          loss = self.F.cross_entropy(out[0], self.y) + self.aux_weight * sum(
              self.F.cross_entropy(aux, self.y) for aux in out[1:])
        else:
          loss = self.F.cross_entropy(out, self.y)
      loss.backward()
      self.optimizer.step()
    return {'times': [self._timed(step) for _ in range(req['count'])]}

  def eval(self, req: dict) -> dict:
    def step():
      self.net.eval()
      with self.torch.no_grad():
        logits = self.net(self.x)
        self.F.cross_entropy(logits, self.y, reduction='sum'), (logits.argmax(1) == self.y).sum()
    return {'times': [self._timed(step) for _ in range(req['count'])]}

  def _timed(self, fn) -> float:
    t0 = time.perf_counter()
    fn()
    self.sync()
    return time.perf_counter() - t0

  def finish(self, _: dict) -> dict:
    cuda = self.device.type == 'cuda'
    return {'peak_rss': harness.peak_rss_bytes(),
            'device_peak': self.torch.cuda.max_memory_allocated() if cuda else None}


# ----------------------------------------------------------------------------- driver


def start(name: str, variant: Variant, size: int, batch: int, torch_device: str,
          flops: bool, model: str = 'd2l', aux_weight: float = 0.0) -> harness.Worker:
  kwargs = {'size': size, 'batch': variant.batch or batch, 'model': model,
            'aux_weight': aux_weight, **variant.kwargs}
  env = dict(variant.env)
  if variant.factory.endswith('TorchSide'):
    kwargs['device'] = torch_device
  else:
    kwargs['flops'] = flops
    if variant.xla_flags:
      env['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {variant.xla_flags}".strip()
  return harness.Worker(variant.factory, kwargs, env, name)


def bench_size(args: argparse.Namespace, size: int, variants: dict[str, Variant],
               reference: list[str]) -> dict:
  """Every variant's workers at ``size``: warm-up, interleaved rounds per task, memory."""
  workers = {name: start(name, v, size, args.batch, args.torch_device, i == 0, args.model,
                        args.aux_weight)
             for i, (name, v) in enumerate(variants.items())}
  try:
    infos = {name: w.call({'op': 'info'}) for name, w in workers.items()}
    batches = {name: variants[name].batch or args.batch for name in workers}
    flops = next(i['flops'] for i in infos.values() if i.get('flops'))
    tasks = {}
    for task in args.tasks:
      first = {}
      for name, w in workers.items():  # warm-up: the first step apart, then untimed ones
        first[name] = w.call({'op': task, 'count': 1})['times'][0]
        w.call({'op': task, 'count': args.warmup - 1})
      rows = harness.interleaved_rounds(
          workers, task, batches, reference, steps=args.steps, min_rounds=args.min_rounds,
          max_rounds=args.max_rounds, max_spread=args.spread, budget_s=args.budget_s)
      for name, row in rows.items():
        row.update(first_step_s=first[name], batch=batches[name],
                   gflops=row['img_per_s']['median'] * flops[task] / 1e9)
      tasks[task] = rows
    ends = {name: w.call({'op': 'finish'}) for name, w in workers.items()}
  finally:
    for w in workers.values():
      w.close()
  return {'size': size, 'model': args.model, 'aux_weight': args.aux_weight,
          'flops_per_image': flops, 'tasks': tasks, 'workers': {
      name: {**infos[name], **ends[name], 'xla_flags_added': variants[name].xla_flags,
             'env': variants[name].env} for name in workers}}


def table(results: list[dict], reference: list[str]) -> str:
  rows = []
  for r in results:
    for task, by_name in r['tasks'].items():
      for name, s in by_name.items():
        w = r['workers'][name]
        memory = (f"{harness.gib(w['device_peak'])} GiB device" if w['device_peak']
                  else f"{harness.gib(w['peak_rss'])} GiB RSS")
        ratio = f"{harness.fmt_range(s['ratio'], '.2f', 'x')}, {s['rounds']} rounds"
        compile_s = f"{w['compile_s']:.1f}" if w['compile_s'] is not None else '-'
        rows.append([r['size'], task, name, s['batch'], f"{s['img_per_s']['median']:.1f}",
                     f"{s['img_per_s']['min']:.1f}-{s['img_per_s']['max']:.1f}", ratio,
                     f"{s['gflops']:.1f}", compile_s, f"{s['first_step_s']:.1f}", memory])
  versus = 'faster PyTorch' if reference[0].startswith('PyTorch') else reference[0]
  return harness.markdown_table(
      ['size', 'task', 'variant', 'batch', 'img/s median', 'min-max', f'vs {versus}',
       'GFLOP/s', 'compile s', 'first step s', 'peak memory'], rows)


def model_line(args: argparse.Namespace) -> str:
  """What both sides train, aux heads included."""
  if args.model == 'd2l':
    return "model: d2l (the book's GoogLeNet; 1 channel, 10 classes, no aux heads)"
  aux = (f'on, loss weight {args.aux_weight:g} each (torchvision\'s default aux_logits=True)'
         if args.aux_weight else 'off (aux_logits=False)')
  return ("model: inception_v1 (torchvision's GoogLeNet with BatchNorm; 3 channels, 1,000 "
          f'classes; PyTorch: torchvision.models.googlenet(weights=None, init_weights=True)); '
          f'aux heads {aux}')


def choose_variants(args: argparse.Namespace, platform: str,
                    parser: argparse.ArgumentParser) -> dict[str, Variant]:
  """The gnet-jax columns: ``--ops-at`` revisions first, then ``--jax-variants`` (or the
  platform's defaults), 'sweep' expanded."""
  names = (list(DEFAULT_CPU_VARIANTS if platform == 'cpu' else DEFAULT_ACCEL_VARIANTS)
           if args.jax_variants is None else
           [v.strip() for v in args.jax_variants.split(',') if v.strip()])
  if 'sweep' in names:
    names[names.index('sweep'):names.index('sweep') + 1] = ['gnet-jax', *SWEEP]
  known = {**JAX_VARIANTS, **SWEEP}
  if unknown := [n for n in names if n not in known]:
    parser.error(f'unknown --jax-variants {unknown}; choose from {list(known)} or sweep')
  if not names and not args.ops_at:
    parser.error('--jax-variants names no variant; name at least one (e.g. gnet-jax)')
  variants = {f'gnet-jax ops@{rev}': jax_variant(ops_at=rev) for rev in args.ops_at}
  return {**variants, **{n: known[n] for n in dict.fromkeys(names)}}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--sizes', default='28,96', help='comma-separated image sizes (e.g. 224)')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=10, help='timed steps per variant and round')
  parser.add_argument('--min-rounds', type=int, default=3, help='rounds at least')
  parser.add_argument('--max-rounds', type=int, default=8, help='rounds at most')
  parser.add_argument('--spread', type=float, default=0.1,
                      help='stop once every ratio varies by at most this much over rounds')
  parser.add_argument('--budget-s', type=float, default=900,
                      help='stop adding rounds for a task after this many seconds')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps first (>= 1)')
  parser.add_argument('--tasks', default='train,eval', help="'train', 'eval' or both")
  parser.add_argument('--jax-variants', default=None, help='comma-separated from: ' + ', '.join(
      [*JAX_VARIANTS, *SWEEP]) + ", or 'sweep' (gnet-jax and every XLA flag and batch split); "
      f"default: {', '.join(DEFAULT_CPU_VARIANTS)} on CPU, {', '.join(DEFAULT_ACCEL_VARIANTS)} "
      'elsewhere')
  parser.add_argument('--ops-at', action='append', default=[], metavar='REV',
                      help='also gnet-jax traced with gnet_jax/ops.py as committed at REV '
                      '(repeatable; first column)')
  parser.add_argument('--no-torch', action='store_true', help='leave the PyTorch columns out')
  parser.add_argument('--model', choices=harness.MODELS, default='d2l',
                      help="the network on both sides: the book's GoogLeNet (d2l, 1 channel, 10 "
                      "classes) or torchvision's (inception_v1: BatchNorm, 3 channels, 1,000 "
                      'classes, against torchvision.models.googlenet)')
  parser.add_argument('--aux-weight', type=float, default=None,
                      help='inception_v1: the aux heads\' loss weight, 0 for none (default 0.3: '
                      'on, as torchvision.models.googlenet() builds them)')
  parser.add_argument('--json', help='also write the results to this file')
  args = parser.parse_args(argv)
  args.tasks = [t for t in args.tasks.split(',') if t]
  args.warmup = max(args.warmup, 1)
  if args.model == 'd2l' and args.aux_weight:
    parser.error("--aux-weight needs --model inception_v1 (the book's network is compared "
                 'without aux heads: its PyTorch original has none)')
  if args.aux_weight is None:
    args.aux_weight = harness.INCEPTION_AUX_WEIGHT if args.model == 'inception_v1' else 0.0
  if args.aux_weight < 0:
    parser.error(f'--aux-weight {args.aux_weight} is negative; give 0 (no aux heads) or more')
  return args, parser


def main(argv: list[str] | None = None) -> int:
  args, parser = parse_args(argv)
  machine = harness.machine_info()
  platform = harness.jax_platform()
  variants = choose_variants(args, platform, parser)
  torch_device, torch_note = harness.torch_device(platform, args.no_torch)
  args.torch_device = torch_device or 'cpu'
  if torch_device:
    variants.update(TORCH_VARIANTS)
  elif not args.no_torch:
    print(f'note: {torch_note}; PyTorch left out', file=sys.stderr)
  reference = list(TORCH_VARIANTS) if torch_device else [next(iter(variants))]
  try:
    results = [bench_size(args, int(s), variants, reference) for s in args.sizes.split(',') if s]
  except harness.WorkerDied as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  first = results[0]['workers']
  machine.update(load_after=os.getloadavg()[0], platform=platform,
                 jax_device=first[next(iter(variants))]['device'],
                 torch_device=next((first[n]['device'] for n in TORCH_VARIANTS if n in first),
                                   None))
  print('\n'.join(harness.machine_lines(machine)) + '\n')
  print(model_line(args) + '\n')
  print(table(results, reference))
  flop_counts = ', '.join(f"{r['size']}px: train {r['flops_per_image']['train'] / 1e9:.3f}, "
                          f"eval {r['flops_per_image']['eval'] / 1e9:.3f}" for r in results)
  print(f'\n{args.steps} timed steps per variant and round after {args.warmup} warm-up step(s), '
        'interleaved; img/s: median over all timed steps; ratios: median over rounds of each '
        "round's img/s ratio, with its range; GFLOP/s from XLA's cost analysis of GoogLeNet "
        f'(GFLOP/image {flop_counts}); compile s: train and eval steps; peak memory: the '
        'worker process (RSS) or the device allocator.')
  for name, w in first.items():
    if w.get('xla_flags_added') or w.get('env'):
      print(f"{name}: XLA_FLAGS added {w['xla_flags_added'] or '-'}, env {w['env'] or '-'}")
  harness.write_json(args.json, {'machine': machine, 'results': results})
  return 0


if __name__ == '__main__':
  sys.exit(main())
