"""Which JAX backend a command starts, and the machine a measurement ran on.

libtpu is installed beside jax for ahead-of-time compilation to TPU topologies (evo_jax/aot.py,
the `aot` and `test` extras). On a machine without a TPU chip, JAX would still try to start it
and print a screen of TPU start-up errors before every command. `choose_platform()` starts only
the backends the machine has (the CPU, and a GPU where one is visible and its plugin installed),
unless the user chose with JAX_PLATFORMS. Compiling for a TPU topology does not need the TPU
backend to run: aot.py still works.
"""
import glob
import importlib.metadata
import importlib.util
import os
import platform

import jax

GOOGLE_PCI_VENDOR = "0x1ae0"        # TPU chips appear on the PCI bus under Google's vendor id
NVIDIA_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl")


def has_tpu_chip():
  for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(path) as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def installed_gpu_plugins():
  """'cuda' / 'rocm' for each JAX PJRT plugin package installed (jax[cuda12] and the like)."""
  names = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
  return [kind for kind in ("cuda", "rocm") if any(kind in n for n in names)]


def choose_platform():
  """Keeps JAX from starting libtpu where there is no TPU chip (see the module docstring).
  Call before the first use of a device; does nothing when JAX_PLATFORMS is set."""
  if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
    return
  if importlib.util.find_spec("libtpu") is None or has_tpu_chip():
    return
  platforms = ["cpu"]
  if any(os.path.exists(d) for d in NVIDIA_DEVICE_FILES) and "cuda" in installed_gpu_plugins():
    platforms.insert(0, "cuda")
  jax.config.update("jax_platforms", ",".join(platforms))


def machine():
  """What the timings were measured on: the accelerator, or the CPU's model and core count."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    name = platform.machine()
    try:
      with open("/proc/cpuinfo") as f:
        name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
      pass
    what = f"CPU {name}, {os.cpu_count()} cores"
  else:
    what = f"{jax.device_count()} x {device.device_kind}"
  return f"{what}, jax {jax.__version__}"
