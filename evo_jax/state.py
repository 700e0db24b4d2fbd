"""A run's train state: its parameters and optimizer, how they are initialised, and where every
array of the state lives on a device mesh.

`state_layout(cfg, mesh)` is what the Trainer, checkpoint loading (run.py), Hugging Face import
(convert.py) and ahead-of-time compilation (aot.py) all build from a config.
"""
import functools
from typing import NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from evo_jax import checkpoint
from evo_jax import model as model_lib
from evo_jax import progression
from evo_jax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


@flax.struct.dataclass
class AdaptiveTrainState(TrainState):
  """The state of a run with progression.t_base = adaptive: also the running mean latent
  cross-entropy per t bin, from which its t distribution is drawn (progression.py). A class of
  its own, so that every other run's checkpoints keep their structure."""
  ce_by_bin: jax.Array


def make_state(step, params, opt_state, t_bins=0):
  """A TrainState, or with t_bins > 0 an AdaptiveTrainState whose bins start at 0 (unseen)."""
  if not t_bins:
    return TrainState(step=step, params=params, opt_state=opt_state)
  return AdaptiveTrainState(step=step, params=params, opt_state=opt_state,
                            ce_by_bin=jnp.zeros((t_bins,), jnp.float32))


def learning_rate_fn(ocfg, total_steps):
  decay_steps = ocfg.decay_steps or total_steps
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=ocfg.lr, warmup_steps=ocfg.warmup_steps,
      decay_steps=max(decay_steps, ocfg.warmup_steps + 1), end_value=ocfg.lr * ocfg.min_lr_ratio)


def make_optimizer(ocfg, total_steps):
  """AdamW with warm-up, cosine decay and global-norm clipping; no decay on vectors (norms,
  biases). optim.pretrained_lr_scale != 1 scales the steps of every parameter but the time
  conditioning and time head (model.is_time_param): the learning-rate groups of a model
  adapted from a pretrained AR one, whose backbone moves slower than its new parameters."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  parts = [optax.clip_by_global_norm(ocfg.clip_norm),
           optax.adamw(learning_rate_fn(ocfg, total_steps), b1=ocfg.b1, b2=ocfg.b2,
                       weight_decay=ocfg.weight_decay, mask=decay_mask)]
  if ocfg.pretrained_lr_scale != 1.0:
    pretrained = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: not model_lib.is_time_param(path), params)
    parts.append(optax.masked(optax.scale(ocfg.pretrained_lr_scale), pretrained))
  return optax.chain(*parts)


# Jitted: run op by op, an initialisation dispatches hundreds of small computations.
@functools.partial(jax.jit, static_argnames=("model", "seq_len", "unbox"))
def init_params(model, rng, seq_len=8, unbox=True):
  """Fresh float32 parameters. unbox=False keeps flax's logical-axis boxes, from which
  `state_shardings` reads where each array goes."""
  B, L, D = 1, seq_len, model.cfg.latent_width
  tokens = jnp.zeros((B, L), jnp.int32)
  variables = model.init(rng, tokens, jnp.zeros((B, L, D)), jnp.zeros((B, L), bool),
                         jnp.zeros((B, L)), jnp.zeros((B, L), jnp.int32),
                         jnp.ones((B, L, L), bool))
  return nn.meta.unbox(variables) if unbox else variables


@functools.partial(jax.jit, static_argnames=("model", "tx", "unbox", "t_bins"))
def init_state(model, tx, rng, unbox=True, t_bins=0):
  """A fresh train state: step 0, fresh parameters and optimizer moments (make_state)."""
  params = init_params(model, rng, unbox=unbox)
  return make_state(jnp.zeros((), jnp.int32), params, tx.init(params), t_bins)


def state_shardings(model, tx, mesh, rules, t_bins=0):
  """The NamedSharding of every leaf of the train state: the optimizer's moments follow their
  parameters, scalars (and the t bins) are replicated."""
  boxed = jax.eval_shape(lambda r: init_state(model, tx, r, unbox=False, t_bins=t_bins),
                         jax.random.key(0))
  return sharding.tree_shardings(boxed, mesh, rules)


class StateLayout(NamedTuple):
  """A run's model and optimizer with where its train state lives on a mesh."""
  model: model_lib.EvoTransformer
  tx: optax.GradientTransformation
  shardings: TrainState     # NamedSharding of every leaf
  abstract: TrainState      # ShapeDtypeStructs with those shardings (for restores, lowering)
  init: object              # key -> a fresh state, laid out so


def state_layout(cfg, mesh) -> StateLayout:
  """What the Trainer, checkpoint loading, import and ahead-of-time compilation all build from
  a config: the model, the optimizer and the train state's layout on `mesh`."""
  model = model_lib.EvoTransformer(model_lib.from_config(cfg.model))
  tx = make_optimizer(cfg.optim, cfg.train.steps)
  t_bins = progression.adaptive_bins(cfg.progression)
  shardings = state_shardings(model, tx, mesh, sharding.logical_rules(cfg.sharding.rules),
                              t_bins)
  init = lambda rng: init_state(model, tx, rng, t_bins=t_bins)
  abstract = checkpoint.abstract_like(jax.eval_shape(init, jax.random.key(cfg.seed)), shardings)
  return StateLayout(model, tx, shardings, abstract, jax.jit(init, out_shardings=shardings))
