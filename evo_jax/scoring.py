"""Scoring continuations by the AR-path log-likelihood (method.md section 6).

The AR path is the latent stream at W = 1, t = 1: every position holds a latent of pure noise
that sees only the clean tokens before it, so one forward pass gives the exact conditional
log-probability of every token given its prefix, the likelihood of AR decoding. A continuation's
score is the sum over its tokens; it is "greedy" when each of its tokens is the argmax.

    scorer = Scorer(model, params, context=cfg.data.seq_len)
    scorer.score([(context_ids, continuation_ids), ...]) -> [Score(logprob, is_greedy, n_tokens)]

Pairs are scored in batches of fixed size, rows padded to a power of two (>= 16) of tokens, so
that a few compilations serve any mix of lengths. The rows go through loss.ar_path_forward,
the AR path that training's held-out metrics use too; the noise of a latent depends only on
the seed and its position, so batching and padding never change a score. A pair longer than
the model's context loses tokens from the left of its context.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from evo_jax import loss
from evo_jax.progress import Progress
from evo_jax.errors import UserError


class ScoringError(UserError):
  pass


class Score(NamedTuple):
  logprob: float       # sum of log p(token | prefix) over the continuation (nats)
  is_greedy: bool      # every continuation token is the argmax of its distribution
  n_tokens: int        # tokens scored


def _score_rows(model, params, tokens_BxL, start_B, end_B, rng):
  """(sum of log-probs of tokens [start, end) of each row, all of them argmax?, their count)."""
  B, L = tokens_BxL.shape
  i_L = jnp.arange(L)[None]
  batch = {"tokens": tokens_BxL, "segment_ids": (i_L < end_B[:, None]).astype(jnp.int32),
           "positions": jnp.broadcast_to(i_L, (B, L))}
  _, logits = loss.ar_path_forward(model, params, batch, rng)
  logits = logits.astype(jnp.float32)
  scored = (i_L >= start_B[:, None]) & (i_L < end_B[:, None])
  logprob = -loss.token_xent(logits, tokens_BxL)
  greedy = (jnp.argmax(logits, axis=-1) == tokens_BxL) | ~scored
  return (jnp.where(scored, logprob, 0.0).sum(axis=1), jnp.all(greedy, axis=1),
          scored.sum(axis=1))


_score_rows_jit = jax.jit(_score_rows, static_argnums=0)   # one compilation per model and shape


def bucket(n, cap):
  """The row length for n tokens: the next power of two >= 16, at most cap rounded up to 16."""
  return min(max(16, 1 << (max(n, 1) - 1).bit_length()), -(-cap // 16) * 16)


def truncate(context_ids, continuation_ids, context):
  """Context + continuation cut from the left to the model's context (the continuation is kept
  whole: it is what is scored)."""
  if len(continuation_ids) > context:
    raise ScoringError(f"a continuation of {len(continuation_ids)} tokens does not fit the "
                       f"model's context of {context}")
  keep = context - len(continuation_ids)
  return list(context_ids)[max(0, len(context_ids) - keep):], list(continuation_ids)


class Scorer:
  """AR-path log-likelihoods of (context, continuation) token-id pairs under one model."""

  def __init__(self, model, params, context, batch_size=16, seed=0):
    if batch_size < 1:
      raise ScoringError(f"batch_size must be >= 1, got {batch_size}")
    self.model, self.params, self.context, self.batch_size = model, params, context, batch_size
    self.rng = jax.random.key(seed)

  def score(self, pairs, progress_label=None):
    """[Score] in the order of `pairs` (lists of token ids; the context may be empty). With
    progress_label, a progress line (progress.Progress) per batch."""
    pairs = [truncate(c, x, self.context) for c, x in pairs]
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out = [None] * len(pairs)
    B = self.batch_size
    starts = range(0, len(order), B)
    progress = Progress(progress_label, len(starts), "batches") if progress_label else None
    for first in starts:
      chunk = order[first:first + B]
      L = bucket(max(len(pairs[i][0]) + len(pairs[i][1]) for i in chunk), self.context)
      tokens = np.zeros((B, L), np.int32)
      start, end = np.zeros((B,), np.int32), np.zeros((B,), np.int32)
      for row, i in enumerate(chunk):
        ctx, cont = pairs[i]
        tokens[row, :len(ctx) + len(cont)] = ctx + cont
        start[row], end[row] = len(ctx), len(ctx) + len(cont)
      logprob, greedy, count = jax.device_get(
          _score_rows_jit(self.model, self.params, tokens, start, end, self.rng))
      for row, i in enumerate(chunk):
        out[i] = Score(float(logprob[row]), bool(greedy[row]), int(count[row]))
      if progress:
        progress.advance()
    if progress:
      progress.done()
    return out


def rolling_pairs(prefix_ids, ids, context, stride=None):
  """(context, continuation) pairs that score every token of `ids` exactly once, each with as
  much preceding text as fits: chunks of `stride` tokens (default: half the context) after the
  first, which fills the whole context behind `prefix_ids` (e.g. [bos])."""
  stride = stride or max(1, context // 2)
  if not 1 <= stride < context:
    raise ScoringError(f"stride must be in [1, {context - 1}], got {stride}")
  text = list(prefix_ids) + list(ids)
  pairs, done = [], len(prefix_ids)
  first = context - len(prefix_ids)
  while done < len(text):
    n = first if done == len(prefix_ids) else stride
    n = max(1, min(n, len(text) - done))
    pairs.append((text[max(0, done + n - context):done], text[done:done + n]))
    done += n
  return pairs
