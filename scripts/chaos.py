r"""Chaos test for any config: random SIGKILLs and a damaged checkpoint, then a comparison
with the uninterrupted run.

    python -m scripts.chaos --config=configs/vit/fashion_mnist.py:tokens_choice,tiny \
        --workdir=/tmp/chaos --kills=10 -- --config.num_train_steps=400 \
        --config.checkpoint_every_steps=20

1. The reference: the command trains uninterrupted in <workdir>/reference (its training
   time T, without start-up and compilation, sets the kill schedule).
2. The chaos run in <workdir>/chaos: the same command, killed with SIGKILL `--kills`
   times, each time at a random moment between 0.1·T/N and 1.5·T/N after the restarted
   run logs its first training step (N = --kills, so the kills spread over the whole run;
   each restart resumes from the newest checkpoint; kills land between and during
   checkpoint writes); then the newest checkpoint is damaged (its largest array file
   truncated to half) and the command runs to the end.
3. The report (<workdir>/chaos_report.json, printed): kills, how many landed while a
   checkpoint was being written (orbax's temporary directory present afterwards), the
   checkpoints the trainer found damaged and fell back from, and the largest difference
   between the two runs' logged training losses and final metrics. An exact resume
   gives 0 (or float noise ~1e-7 where XLA reorders a reduction).

Everything after `--` goes to `python -m moe_jax.train.main` unchanged.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time


def _cmd(config: str, workdir: str, extra: list[str]) -> list[str]:
  return [sys.executable, '-m', 'moe_jax.train.main', f'--config={config}',
          f'--workdir={workdir}'] + extra


def _run(cmd: list[str], log) -> int:
  return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode


def _newest_step_dir(workdir: str) -> str | None:
  steps = [d for d in glob.glob(os.path.join(workdir, 'checkpoints', '*'))
           if os.path.basename(d).isdigit()]
  return max(steps, key=lambda d: int(os.path.basename(d))) if steps else None


def damage_newest_checkpoint(workdir: str) -> str | None:
  """Truncates the largest file of the newest checkpoint's state to half; returns it."""
  step = _newest_step_dir(workdir)
  if step is None:
    return None
  files = [f for f in glob.glob(os.path.join(step, 'state', '**', '*'), recursive=True)
           if os.path.isfile(f)]
  target = max(files, key=os.path.getsize)
  with open(target, 'r+b') as f:
    f.truncate(os.path.getsize(target) // 2)
  return target


def _logged_lines(workdir: str) -> int:
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return sum(1 for _ in f)
  except FileNotFoundError:
    return 0


def _wait_for_training(proc, workdir: str, before: int, timeout: float = 600.0) -> bool:
  """Waits until the run logs a new line (compiled, training); False if it ended first."""
  end = time.time() + timeout
  while time.time() < end:
    if proc.poll() is not None:
      return False
    if _logged_lines(workdir) > before:
      return True
    time.sleep(0.1)
  return True


def _losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, 'results.json')) as f:
    return {int(s): float(v) for s, v in json.load(f)['train_loss']}


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  extra = []
  if '--' in argv:
    i = argv.index('--')
    argv, extra = argv[:i], argv[i + 1:]
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', required=True)
  p.add_argument('--workdir', required=True)
  p.add_argument('--kills', type=int, default=10)
  p.add_argument('--seed', type=int, default=0, help='seed of the kill schedule')
  args = p.parse_args(argv)
  rng = random.Random(args.seed)
  os.makedirs(args.workdir, exist_ok=True)
  ref, chaos = os.path.join(args.workdir, 'reference'), os.path.join(args.workdir, 'chaos')
  log = open(os.path.join(args.workdir, 'chaos.log'), 'a')

  if not os.path.exists(os.path.join(ref, 'results.json')):
    status = _run(_cmd(args.config, ref, extra), log)
    if status:
      raise SystemExit(f'the reference run failed (exit status {status}); see {log.name}')
  with open(os.path.join(ref, 'results.json')) as f:
    ref_time = json.load(f)['train_time_s']
  print(f'reference: {ref_time:.1f} s of training', flush=True)

  kills, mid_write, statuses = [], 0, []
  for k in range(args.kills):
    if os.path.exists(os.path.join(chaos, 'results.json')):
      break
    before = _logged_lines(chaos)
    proc = subprocess.Popen(_cmd(args.config, chaos, extra), stdout=log, stderr=subprocess.STDOUT)
    delay = rng.uniform(0.1, 1.5) * ref_time / args.kills
    if not _wait_for_training(proc, chaos, before):
      statuses.append(proc.wait())                 # finished (or failed) before the kill
      break
    try:
      statuses.append(proc.wait(timeout=delay))    # finished before the kill
      break
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    tmp = glob.glob(os.path.join(chaos, 'checkpoints', '*tmp*'))
    mid_write += bool(tmp)
    newest = _newest_step_dir(chaos)
    kills.append(dict(after_training_s=round(delay, 1), newest_checkpoint=newest and int(os.path.basename(newest)),
                      during_checkpoint_write=bool(tmp)))
    print(f'kill {k + 1}: {delay:.1f} s into training, newest checkpoint {kills[-1]["newest_checkpoint"]}, '
          f'{"during a checkpoint write" if tmp else "between writes"}', flush=True)
  damaged = None
  if not os.path.exists(os.path.join(chaos, 'results.json')):
    damaged = damage_newest_checkpoint(chaos)
    print(f'damaged {damaged}', flush=True)
    statuses.append(_run(_cmd(args.config, chaos, extra), log))
  if statuses and statuses[-1] != 0:
    raise SystemExit(f'the chaos run failed (exit status {statuses[-1]}); see {log.name}')

  a, b = _losses(ref), _losses(chaos)
  with open(os.path.join(ref, 'results.json')) as f:
    ref_final = json.load(f)['final']
  with open(os.path.join(chaos, 'results.json')) as f:
    res = json.load(f)
  report = dict(
      config=args.config, overrides=extra, kills=kills, kills_during_checkpoint_write=mid_write,
      damaged_file=damaged, fallbacks=res.get('damaged_checkpoints', []),
      same_logged_steps=sorted(a) == sorted(b),
      max_train_loss_diff=max((abs(a[s] - b[s]) for s in a if s in b), default=None),
      final_reference=ref_final, final_chaos=res['final'],
      max_final_diff=max(abs(ref_final[k] - res['final'][k]) for k in ref_final))
  with open(os.path.join(args.workdir, 'chaos_report.json'), 'w') as f:
    json.dump(report, f, indent=1)
  print(json.dumps({k: v for k, v in report.items() if k != 'kills'}, indent=1))
  return report


if __name__ == '__main__':
  main()
