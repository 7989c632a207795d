"""Replays a run's steps from one of its checkpoints: loss, accuracy and update size, step by step.

    python -m benchmarks.replay --workdir runs/book --start 4500 --stop 4606 --check 4600
    python -m benchmarks.replay --workdir runs/book --start 4500 --stop 4680 --ops-at c638eba ...
    python -m benchmarks.replay --workdir runs/book --start 4500 --stop 4680 --eval
    GNET_JAX_XLA_DEFAULTS=0 python -m benchmarks.replay --workdir runs/book --start 4500 ...
    python -m benchmarks.replay --workdir runs/book --start 4500 --stop 4680 --eval --torch

A run's metrics are sums over ~94-step windows; when one window goes wrong (a
loss spike), this says which step, and whether it is a property of the weights
and batches or of the last bits of the arithmetic:

- gnet-jax (default) takes the exact steps ``train.py`` takes (the same
  ``train.make_train_step``, batches, XLA flags), so from a checkpoint it
  retraces the run bit for bit: ``--check STEP`` compares the parameters
  with that step's checkpoint. A run trained by an older commit is retraced
  with that commit's kernels, ``--ops-at REV`` (``gnet_jax/ops.py`` as
  committed there, as ``benchmarks.throughput --ops-at`` swaps it in): kernels
  that compute the same values may still round differently in the last bit.
- ``GNET_JAX_XLA_DEFAULTS=0`` compiles with XLA's own CPU flags instead of
  gnet-jax's (``gnet_jax.xla_flags``): the same computation, different
  rounding in the last bits.
- ``--torch`` continues from the same weights in the PyTorch original
  (``gnet_jax/torch_reference.py``, plain SGD as the config), on the same batches
  with the same float32 pixels.

Per step: the batch's mean loss and accuracy, and ``update_norm``, the global
L2 norm of the parameter change (for plain SGD, learning rate x gradient
norm). ``--eval`` evaluates the test split after the last step. ``--out``
writes every row and the summary as JSON. Runs on one device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gnet_jax import xla_flags

xla_flags.apply_defaults()  # as train.py does, before JAX starts

import numpy as np  # noqa: E402

from benchmarks import fidelity, harness  # noqa: E402


def param_distance(a, b) -> float:
  """Global L2 distance between two parameter trees, in float64 on the host."""
  import jax
  return float(np.sqrt(sum(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)
                           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))))


def batches_from(data, config, start: int, stop: int):
  """``(step, batch)`` for steps ``start + 1 .. stop`` in ``train.py``'s order, across epochs."""
  from gnet_jax import input_pipeline
  per_epoch = input_pipeline.steps_per_epoch(len(data.train_labels), config.batch_size)
  step = start
  while step < stop:
    epoch, position = divmod(step, per_epoch)
    for batch in input_pipeline.train_batches(data.train_images, data.train_labels,
                                              config.batch_size, config.seed, epoch, position):
      step += 1
      yield step, batch
      if step >= stop:
        return


def replay_jax(workdir: str, ck, data, stop: int, check: set[int], evaluate: bool) -> dict:
  """gnet-jax's own steps from checkpoint ``ck``; optionally compared with later checkpoints."""
  import jax
  from gnet_jax import input_pipeline, parallel, state as state_lib, train
  config, spec = ck.config, ck.spec
  per_epoch = input_pipeline.steps_per_epoch(len(data.train_labels), config.batch_size)
  runner = parallel.make_runner(config, devices=jax.devices()[:1])
  model = state_lib.create_model(config, spec)
  tx = state_lib.create_optimizer(config, per_epoch)
  step_fn = train.make_train_step(runner, model, tx, config, spec)
  state = runner.put_state(ck.state)
  rows, checks = [], {}
  params, sums = runner.to_host(state.params), runner.to_host(state.metrics)
  for step, batch in batches_from(data, config, ck.step, stop):
    state = step_fn(state, runner.put_batch(batch))
    new_params, new_sums = runner.to_host(state.params), runner.to_host(state.metrics)
    n = len(batch['label'])
    rows.append({'step': step, 'loss': float(new_sums['loss_sum'] - sums['loss_sum']) / n,
                 'acc': int(new_sums['correct'] - sums['correct']) / n,
                 'update_norm': param_distance(new_params, params)})
    params, sums = new_params, new_sums
    if step in check:
      distance = param_distance(params, state_lib.load_checkpoint(workdir, step).state.params)
      checks[step] = {'identical': distance == 0.0, 'distance': distance}
  result = {'rows': rows, 'checks': checks}
  if evaluate:
    eval_fn = train.compile_eval(runner, model, config.image_size, spec)
    test = train.evaluate(runner, eval_fn, state.variables, data.test_images, data.test_labels,
                          train.eval_batch_size(config, 1))
    result['test'] = {'loss': test['loss'], 'accuracy': test['accuracy']}
  return result


def replay_torch(ck, data, stop: int, evaluate: bool) -> dict:
  """The PyTorch original's steps from the same weights, on the same batches and pixels."""
  torch = fidelity.import_torch()
  config = ck.config
  fidelity.check_recipe(config)
  fidelity.setup_torch(torch, 'cpu')
  net = fidelity.torch_net(torch, ck.state.params, ck.spec.image_shape[-1],
                           ck.spec.num_classes, 'cpu')
  optimizer = fidelity.torch_optimizer(torch, config, net.parameters())
  criterion = torch.nn.CrossEntropyLoss()
  rows = []
  for step, batch in batches_from(data, config, ck.step, stop):
    x = fidelity.torch_input(torch, batch['image'], config.image_size, 'cpu')
    y = torch.from_numpy(np.asarray(batch['label'])).long()
    before = [p.detach().clone() for p in net.parameters()]
    optimizer.zero_grad(set_to_none=True)
    logits = net(x)
    loss = criterion(logits, y)
    loss.backward()
    optimizer.step()
    change = sum(float(((p.detach().double() - b.double()) ** 2).sum())
                 for p, b in zip(net.parameters(), before))
    accuracy = float((logits.argmax(1) == y).double().mean())
    rows.append({'step': step, 'loss': float(loss.detach()), 'acc': accuracy,
                 'update_norm': change ** 0.5})
  result = {'rows': rows, 'checks': {}}
  if evaluate:
    test = fidelity.torch_evaluate(torch, net, data, config.batch_size, config.image_size, 'cpu')
    result['test'] = {'loss': test['loss'], 'accuracy': test['accuracy']}
  return result


def summary_lines(result: dict, spike_factor: float) -> list[str]:
  """The steps whose loss is ``spike_factor`` x the median loss or more, then the totals."""
  rows = result['rows']
  median = float(np.median([r['loss'] for r in rows]))
  lines = ['| step | loss | batch acc | update norm |', '|---|---|---|---|']
  spikes = [r for r in rows if r['loss'] >= spike_factor * median]
  lines += [f"| {r['step']} | {r['loss']:.3f} | {r['acc']:.3f} | {r['update_norm']:.4f} |"
            for r in spikes]
  first = spikes[0]['step'] if spikes else None
  lines.append(f'{len(rows)} steps {rows[0]["step"]}-{rows[-1]["step"]}: median loss '
               f'{median:.3f}, mean {np.mean([r["loss"] for r in rows]):.4f}, largest update '
               f'{max(r["update_norm"] for r in rows):.4f}; first step at {spike_factor:g}x the '
               f'median loss or more: {first}')
  for step, c in result['checks'].items():
    lines.append(f'parameters after step {step} vs its checkpoint: '
                 + ('bit-identical' if c['identical'] else f"L2 distance {c['distance']:.6g}"))
  if 'test' in result:
    lines.append(f"test after step {rows[-1]['step']}: accuracy {result['test']['accuracy']:.4f}, "
                 f"loss {result['test']['loss']:.4f}")
  return lines


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help="the run's --workdir")
  parser.add_argument('--start', type=int, required=True, help='the checkpoint step to start from')
  parser.add_argument('--stop', type=int, required=True, help='the last step to take')
  parser.add_argument('--check', type=int, nargs='*', default=[],
                      help="compare the parameters with these steps' checkpoints")
  parser.add_argument('--eval', action='store_true', help='evaluate the test split at the end')
  parser.add_argument('--torch', action='store_true', help='continue in the PyTorch original')
  parser.add_argument('--ops-at', metavar='REV',
                      help="trace GoogLeNet with gnet_jax/ops.py as committed at REV (the run's)")
  parser.add_argument('--spike-factor', type=float, default=3.0,
                      help='list the steps whose loss is this many times the median or more')
  parser.add_argument('--out', help='write the rows and the summary to this JSON file')
  args = parser.parse_args(argv)
  from gnet_jax import cli, state as state_lib, train

  if args.stop <= args.start:
    cli.fail(f'--stop {args.stop} must be after --start {args.start}')
  try:
    ck = state_lib.load_checkpoint(args.workdir, args.start)
    data = train.load_data(ck.config)
  except cli.InputError as e:
    cli.fail(str(e))
  if args.torch:
    result = replay_torch(ck, data, args.stop, args.eval)
  else:
    with harness.models_using(harness.ops_at(args.ops_at) if args.ops_at else None):
      # every trace of the model happens inside
      result = replay_jax(args.workdir, ck, data, args.stop, set(args.check), args.eval)
  for line in summary_lines(result, args.spike_factor):
    print(line)
  if args.out:
    Path(args.out).write_text(json.dumps({'workdir': str(args.workdir), 'start': args.start,
                                          'framework': 'torch' if args.torch else 'jax',
                                          'ops_at': args.ops_at,
                                          **result}, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())
