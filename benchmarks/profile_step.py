"""Where one training step's time goes, gnet-jax next to the PyTorch original (CPU).

    python benchmarks/profile_step.py                 # 96x96, batch 128
    python benchmarks/profile_step.py --size 28 --no-torch

gnet-jax: the AOT-compiled train step of ``train.py`` under ``jax.profiler``
with ``--xla_cpu_enable_xprof_traceme=true``, so that every loop fusion XLA:CPU
emits is a trace event; each is sorted into a kind by the HLO it computes
(from the compiled module's metadata). XLA:CPU's convolution and matmul
thunks run in Eigen and do not appear one by one, so they are what remains of
the step's wall time. Fusion times are thread time (a fusion runs on up to
both cores). PyTorch: ``torch.profiler``'s self time per ATen op, channels_last
(its faster layout here). Both run in this process, one after the other.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))

TRACE_FLAG = '--xla_cpu_enable_xprof_traceme=true'


def _fusion_kind(name: str, opcode: str, metadata: str) -> str:
  """A readable kind for one XLA:CPU kernel, from its name, opcode and op_name metadata."""
  backward = 'transpose(jvp' in metadata
  if opcode == 'convolution':
    return 'convolution (XLA, traced)'
  if opcode == 'dot':
    return 'matmul (traced)'
  if 'transpose' in name or 'copy' in name:
    return 'layout transposes/copies'
  if 'concatenate' in name:
    return 'concatenations'
  if 'reduce-window' in name or 'reduce' in name:
    return 'reductions (pools, bias gradients, loss)'
  if 'select' in name or 'select_n' in metadata:
    return 'ReLU/max-pool backward (selects)' if backward else 'selects, forward'
  if 'pad' in name:
    return 'padding (fused with ReLU/adds)' + (', backward' if backward else ', forward')
  if 'maximum' in name:
    return 'ReLU and max-pool forward (maximum)'
  return 'other elementwise' + (', backward' if backward else ', forward')


def profile_jax(size: int, batch: int, steps: int) -> dict:
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + TRACE_FLAG).strip()
  import jax

  from xla_flag_sweep import compiled_train_step, median_step_seconds

  step, state, batch_arrays = compiled_train_step(size, batch)
  hlo = step.as_text()
  step_s, state = median_step_seconds(step, state, batch_arrays, steps)
  with tempfile.TemporaryDirectory() as folder:
    jax.profiler.start_trace(folder, create_perfetto_trace=True)
    for _ in range(steps):
      state = step(state, batch_arrays)
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    trace = next(Path(folder).rglob('*.trace.json.gz'))
    events = json.load(gzip.open(trace))
  events = events['traceEvents'] if isinstance(events, dict) else events

  ops = {}
  for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(.*$', hlo, re.M):
    meta = re.search(r'op_name="([^"]*)"', m.group(0))
    ops[m.group(1)] = (m.group(2), meta.group(1) if meta else '')
  kinds = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and e['name'] in ops:
      kinds[_fusion_kind(e['name'], *ops[e['name']])] += e['dur'] / 1e3 / steps
  return {'step_ms': 1e3 * step_s, 'kinds_thread_ms': dict(kinds)}


def profile_torch(size: int, batch: int, steps: int) -> dict:
  import torch
  from torch.nn import functional as F
  from torch.profiler import ProfilerActivity, profile

  from gnet_jax.torch_reference import googlenet

  torch.manual_seed(0)
  net = googlenet().to(memory_format=torch.channels_last)
  optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
  x = torch.rand(batch, 1, size, size).contiguous(memory_format=torch.channels_last)
  y = torch.randint(0, 10, (batch,))

  def step():
    optimizer.zero_grad()
    F.cross_entropy(net(x), y).backward()
    optimizer.step()

  for _ in range(2):
    step()
  wall = []
  for _ in range(steps):
    t = time.perf_counter()
    step()
    wall.append(time.perf_counter() - t)
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step()
  groups = {'aten::mkldnn_convolution': 'convolution forward',
            'aten::convolution_backward': 'convolution backward',
            'aten::clamp_min': 'ReLU forward', 'aten::threshold_backward': 'ReLU backward',
            'aten::max_pool2d_with_indices': 'max-pool forward',
            'aten::max_pool2d_with_indices_backward': 'max-pool backward',
            'aten::cat': 'concatenations', 'aten::fill_': 'zero-fills (grad buffers)'}
  kinds = collections.Counter()
  for e in prof.key_averages():
    kinds[groups.get(e.key, 'other (autograd engine, adds, optimizer, ...)')] += (
        e.self_cpu_time_total / 1e3 / steps)
  return {'step_ms': 1e3 * sorted(wall)[len(wall) // 2], 'kinds_wall_ms': dict(kinds)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', type=int, default=96)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=3, help='steps timed and profiled')
  parser.add_argument('--no-torch', action='store_true')
  parser.add_argument('--json', help='also write the results to this file')
  args = parser.parse_args()

  load = os.getloadavg()[0]
  jax_result = profile_jax(args.size, args.batch, args.steps)
  torch_result = None if args.no_torch else profile_torch(args.size, args.batch, args.steps)
  print(f'machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; '
        f'load average (1 min) before / after: {load:.2f} / {os.getloadavg()[0]:.2f}')
  print(f'\n## gnet-jax train step at {args.size}x{args.size}, batch {args.batch}: '
        f'{jax_result["step_ms"]:.0f} ms (median of {args.steps})\n')
  print('| kind of XLA:CPU kernel | thread ms per step |\n|---|---|')
  traced = 0.0
  for kind, ms in sorted(jax_result['kinds_thread_ms'].items(), key=lambda kv: -kv[1]):
    print(f'| {kind} | {ms:.1f} |')
    traced += ms
  print(f'| all traced loop fusions (thread time, up to 2 threads each) | {traced:.1f} |')
  print('\nEigen convolutions and matmuls are not traced one by one: they fill the rest of the '
        'step, on both threads.')
  if torch_result:
    print(f'\n## PyTorch channels_last train step: {torch_result["step_ms"]:.0f} ms '
          f'(median of {args.steps})\n')
    print('| ATen ops | ms per step (self time) |\n|---|---|')
    for kind, ms in sorted(torch_result['kinds_wall_ms'].items(), key=lambda kv: -kv[1]):
      print(f'| {kind} | {ms:.1f} |')
  if args.json:
    Path(args.json).write_text(json.dumps({'size': args.size, 'batch': args.batch,
                                           'jax': jax_result, 'torch': torch_result}, indent=1))


if __name__ == '__main__':
  main()
