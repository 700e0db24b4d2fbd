"""The sandbox stops or refuses misbehaving programs, with and without its Python-level guard
(which checks the OS layers by themselves), leaves nothing behind, and the next program
still runs."""
import os
import pathlib
import socket
import tempfile
import time

import pytest

from evo_jax import sandbox
from evo_jax.errors import UserError

HELLO = "print('hello')"
# Running as root here, every layer applies.
ALL_LAYERS = ("rlimits", "network-namespace", "read-only-filesystem", "unprivileged-uid",
              "python-guard")


def run_then_check_next_passes(source, **kwargs):
  """Runs `source`, then a normal program: the evaluation goes on after a bad program."""
  result = sandbox.run_program(source, **kwargs)
  after = sandbox.run_program(HELLO)
  assert (after.status, after.stdout) == ("passed", "hello\n")
  return result


def sandbox_dirs():
  return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("evo_sandbox_")}


def live_processes_of(uid):
  """Processes of `uid` that are not zombies (killed ones await their reaping by init)."""
  live = []
  for entry in pathlib.Path("/proc").iterdir():
    try:
      fields = dict(line.split(":\t", 1) for line in (entry / "status").read_text().splitlines())
    except (OSError, ValueError):
      continue  # not a process, or it exited while being read
    if int(fields["Uid"].split()[0]) == uid and not fields["State"].startswith("Z"):
      live.append(entry.name)
  return live


@pytest.fixture
def outside_file():
  """A world-writable file in a world-writable directory outside the sandbox (pytest's
  tmp_path lies in a directory only root may enter): only the sandbox can protect it."""
  with tempfile.TemporaryDirectory() as directory:
    os.chmod(directory, 0o777)
    path = pathlib.Path(directory) / "precious.txt"
    path.write_text("keep me")
    path.chmod(0o666)
    yield path


def test_normal_program_passes_in_fresh_directory_removed_afterwards():
  before = sandbox_dirs()
  result = sandbox.run_program("import os\nprint(os.listdir('.'))\nprint(os.getuid())\n"
                               "print(open('/proc/self/status').read().count('NoNewPrivs:\\t1'))")
  assert result.status == "passed" and result.returncode == 0
  listing, uid, no_new_privs = result.stdout.splitlines()
  assert listing == "['program.py']"
  assert int(uid) != os.getuid() and no_new_privs == "1"
  assert result.layers == ALL_LAYERS
  assert sandbox_dirs() == before


def test_exception_and_exit_status_fail():
  result = sandbox.run_program("raise ValueError('bad answer')")
  assert result.status == "failed" and result.returncode == 1
  assert result.stderr.strip().endswith("ValueError: bad answer")
  assert sandbox.run_program("import sys; sys.exit(3)").returncode == 3


def test_infinite_loop_times_out():
  result = run_then_check_next_passes("while True: pass", timeout_s=1.0)
  assert result.status == "timeout"
  assert 1.0 <= result.seconds < 3.0


def test_cpu_limit_kills_before_the_wall_clock():
  result = sandbox.run_program("while True: pass", timeout_s=10.0, cpu_s=1.0)
  assert result.status == "killed" and result.seconds < 5.0


def test_unbounded_allocation_is_killed():
  result = run_then_check_next_passes("x = []\nwhile True: x.append(bytearray(10**7))",
                                      memory_mb=256)
  assert result.status == "killed"
  assert "memory limit" in result.stderr


@pytest.mark.parametrize("guard", [True, False])
def test_fork_bomb_is_stopped_and_leaves_no_process(guard):
  # Children call setsid() to leave the process group; the uid-wide kill still finds them.
  bomb = ("import os, time\nprint(os.getuid(), flush=True)\nwhile True:\n"
          "  try:\n    if os.fork() == 0:\n      os.setsid()\n"
          "  except BlockingIOError:\n    time.sleep(0.01)\n")
  result = run_then_check_next_passes(bomb, timeout_s=1.5, guard=guard)
  if guard:
    assert result.status == "failed" and "os.fork is disabled" in result.stderr
  else:
    assert result.status == "timeout"
  uid = int(result.stdout.split()[0])
  deadline = time.monotonic() + 2.0
  while live_processes_of(uid) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert live_processes_of(uid) == []


def attempts(calls):
  """A program that tries each call and prints how it failed, one line each."""
  lines = ["import os, shutil"]
  for call in calls:
    lines += ["try:", f"  {call}", "  print('done')", "except OSError as error:",
              "  print(type(error).__name__, error)"]
  return "\n".join(lines) + "\n"


def test_a_fork_bomb_leaves_a_concurrent_program_alone():
  # Each program has its own uid: RLIMIT_NPROC and the final kill are the bomb's alone.
  # (The bomb sleeps between tries, so that the test does not depend on CPU contention.)
  bomb = ("import os, time\nwhile True:\n  try:\n    os.fork()\n"
          "  except BlockingIOError:\n    time.sleep(0.05)\n")
  normal = ("import os, time\ntime.sleep(0.5)\npid = os.fork()\nif pid == 0:\n  os._exit(0)\n"
            "os.waitpid(pid, 0)\nprint('hello')")  # it can still fork
  results = sandbox.run_many([bomb, normal], workers=2, timeout_s=2.0, guard=False)
  assert results[0].status == "timeout"
  assert (results[1].status, results[1].stdout) == ("passed", "hello\n")


@pytest.mark.parametrize("guard", [True, False])
def test_writing_outside_the_directory_is_refused(outside_file, tmp_path, guard):
  (tmp_path / "mine.txt").write_text("mine")
  targets = [outside_file, outside_file.parent / "new.txt", tmp_path / "mine.txt",
             tmp_path / "new.txt"]
  result = run_then_check_next_passes(
    attempts(f"open({str(path)!r}, 'w').write('overwritten')" for path in targets),
    guard=guard)
  assert result.status == "passed"
  # Read-only everywhere; pytest's tmp_path also lies in a directory only root may enter.
  assert result.stdout.splitlines() == ["OSError [Errno 30] Read-only file system: "
                                        f"{str(path)!r}" for path in targets[:2]] + [
    f"PermissionError [Errno 13] Permission denied: {str(path)!r}" for path in targets[2:]]
  assert outside_file.read_text() == "keep me" and (tmp_path / "mine.txt").read_text() == "mine"
  assert os.listdir(outside_file.parent) == ["precious.txt"]
  assert os.listdir(tmp_path) == ["mine.txt"]


@pytest.mark.parametrize("guard", [True, False])
def test_deleting_files_is_refused(outside_file, guard):
  calls = [f"os.remove({str(outside_file)!r})", f"os.unlink({str(outside_file)!r})",
           f"shutil.rmtree({str(outside_file.parent)!r})"]
  result = run_then_check_next_passes(attempts(calls), guard=guard)
  assert result.status == "passed"
  if guard:
    assert result.stdout.splitlines() == [
      f"PermissionError sandbox: {name} is disabled"
      for name in ("os.remove", "os.unlink", "shutil.rmtree")]
  else:
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert all(line.startswith("OSError [Errno 30] Read-only file system: ") for line in lines)
  assert outside_file.read_text() == "keep me"


def test_files_only_root_may_read_stay_unreadable(tmp_path):
  tmp_path.chmod(0o755)
  secret = tmp_path / "secret.txt"
  secret.write_text("password")
  secret.chmod(0o600)
  result = sandbox.run_program(f"print(open({str(secret)!r}).read())")
  assert result.status == "failed" and "password" not in result.stdout
  assert "PermissionError" in result.stderr


@pytest.mark.parametrize("guard", [True, False])
def test_socket_cannot_reach_a_local_listener(guard):
  with socket.create_server(("127.0.0.1", 0)) as server:
    port = server.getsockname()[1]
    program = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
               "s.sendall(b'leak')\nprint('connected')\n")
    result = run_then_check_next_passes(program, guard=guard)
    server.settimeout(0.2)
    with pytest.raises(TimeoutError):
      server.accept()
  assert result.status == "failed" and "connected" not in result.stdout
  refusal = "socket.create_connection is disabled" if guard else "Network is unreachable"
  assert refusal in result.stderr


def test_disk_and_output_floods_are_stopped():
  # The tmpfs (disk_mb, holding program.py too) fills before one file reaches RLIMIT_FSIZE
  # (also disk_mb), which bounds stdout. Python ignores SIGXFSZ: the write fails with EFBIG.
  cases = {"open('big', 'wb').write(b'x' * (2 << 20))": "No space left on device",
           "while True: print('x' * 10000)": "File too large"}
  for program, refusal in cases.items():
    result = run_then_check_next_passes(program, disk_mb=1)
    assert result.status == "failed" and refusal in result.stderr


def test_a_launcher_that_cannot_start_is_an_error():
  with pytest.raises(UserError, match="sandbox: could not start the program: "):
    sandbox.run_program(HELLO, memory_mb=1)


def test_output_is_truncated_to_its_tail():
  result = sandbox.run_program("print('x' * 100000)\nprint('end')", output_chars=100)
  assert result.status == "passed"
  assert result.stdout == "x" * 95 + "\nend\n"


def test_run_many_keeps_order():
  results = sandbox.run_many([f"print({i})" for i in range(4)], workers=2)
  assert [r.stdout for r in results] == ["0\n", "1\n", "2\n", "3\n"]


def test_bad_limits_are_user_errors():
  with pytest.raises(UserError, match="timeout_s must be positive"):
    sandbox.run_program(HELLO, timeout_s=0)
  with pytest.raises(UserError, match="workers must be positive"):
    sandbox.run_many([HELLO], workers=0)
