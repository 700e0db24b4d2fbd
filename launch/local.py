"""Runs N processes of an evo_jax command on this machine, joined by jax.distributed: the
multi-host code path without the hosts, for testing and for CPU experiments.

  python launch/local.py --processes 2 --devices_per_process 4 -- \
      --config configs/tiny.py --workdir runs/mp

Everything after `--` goes to every process (`python -m evo_jax.train` by default); the
launcher adds --coordinator_address/--num_processes/--process_id and gives each process its
own simulated CPU devices. Output lines are prefixed with the process id. If one process
fails, the others are stopped, and the launcher exits with the failure's status.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def relay(index, stream, out):
  for line in iter(stream.readline, ""):
    out.write(f"[{index}] {line}")
    out.flush()


def launch(processes, devices_per_process, module, args, env=None, out=sys.stdout):
  """Starts the processes and waits; returns the first non-zero exit status, else 0."""
  port = free_port()
  env = dict(os.environ if env is None else env)
  # Each process simulates its own devices; the caller's other XLA flags are kept.
  others = [f for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(
      others + [f"--xla_force_host_platform_device_count={devices_per_process}"])
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["PYTHONUNBUFFERED"] = "1"
  procs, relays = [], []
  for i in range(processes):
    cmd = [sys.executable, "-m", module, *args, f"--coordinator_address=localhost:{port}",
           f"--num_processes={processes}", f"--process_id={i}"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    procs.append(p)
    relays.append(threading.Thread(target=relay, args=(i, p.stdout, out), daemon=True))
    relays[-1].start()
  status = 0
  try:
    while any(p.poll() is None for p in procs):
      failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
      if failed:
        status = failed[0]
        break
      time.sleep(0.2)
  finally:
    for p in procs:  # on a failure or Ctrl-C, the rest would wait for their peers forever
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
      p.wait()
    for t in relays:
      t.join(timeout=5)
  return status or next((p.returncode for p in procs if p.returncode), 0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4)
  parser.add_argument("--module", default="evo_jax.train")
  parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the command's arguments")
  a = parser.parse_args()
  # `finally` in launch() stops the processes on a plain kill too.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
  args = a.args[1:] if a.args[:1] == ["--"] else a.args
  sys.exit(launch(a.processes, a.devices_per_process, a.module, args))


if __name__ == "__main__":
  main()
