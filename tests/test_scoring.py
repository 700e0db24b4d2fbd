"""The AR-path scorer (evo_jax/scoring.py) against a computation that shares nothing with it:
reference.ar_path_logits, the AR path recomputed from scratch for one position at a time."""
import jax
import numpy as np
import pytest

import reference
from evo_jax import scoring

CONTEXT = 24
PAIRS = [([2, 5, 9], [12, 7, 30]), ([], [4, 4, 4, 8]), (list(range(10, 30)), [40, 41]),
         ([3] * 30, [6, 7, 8, 9, 10]), ([2], [])]


@pytest.fixture(scope="module")
def params(model_params):
  return model_params[1]


@pytest.fixture(scope="module")
def model(model_params):
  return model_params[0]


def direct(model, params, context, continuation, seed):
  """log p(continuation | context) by ar_path_logits at each position, after the same
  left-truncation to the model's context."""
  context, continuation = scoring.truncate(context, continuation, CONTEXT)
  tokens = np.zeros((CONTEXT,), np.int32)       # one shape for every pair: one compilation
  tokens[:len(context) + len(continuation)] = context + continuation
  n = np.arange(len(context), len(context) + len(continuation), dtype=np.int32)
  if not len(n):
    return 0.0, True
  rows_n = np.resize(n, CONTEXT)                  # padded with repeats, dropped below
  rows = np.broadcast_to(tokens, (CONTEXT, CONTEXT))
  logits = np.asarray(reference.ar_path_logits_at_jit(model, params, rows, rows_n,
                                                      jax.random.key(seed)))[:len(n)]
  logp = jax.nn.log_softmax(logits, axis=-1)[np.arange(len(n)), tokens[n]]
  return float(np.sum(logp)), bool(np.all(np.argmax(logits, -1) == tokens[n]))


@pytest.fixture(scope="module")
def scores(model, params):
  return scoring.Scorer(model, params, CONTEXT, batch_size=4, seed=3).score(PAIRS)


def test_scores_equal_the_no_cache_ar_path(model, params, scores):
  for (context, continuation), s in zip(PAIRS, scores):
    logprob, greedy = direct(model, params, context, continuation, seed=3)
    assert s.n_tokens == len(continuation)
    assert s.logprob == pytest.approx(logprob, rel=1e-5, abs=1e-4)
    assert s.is_greedy == greedy
  assert scores[-1] == (0.0, True, 0)


def test_batching_and_padding_change_nothing(model, params, scores):
  alone = scoring.Scorer(model, params, CONTEXT, batch_size=1, seed=3).score(PAIRS)
  reversed_ = scoring.Scorer(model, params, CONTEXT, batch_size=5, seed=3).score(PAIRS[::-1])[::-1]
  for a, b, c in zip(scores, alone, reversed_):
    assert a.n_tokens == b.n_tokens == c.n_tokens and a.is_greedy == b.is_greedy == c.is_greedy
    np.testing.assert_allclose([a.logprob, a.logprob], [b.logprob, c.logprob], rtol=1e-5, atol=1e-5)


def test_truncation_rolling_windows_and_buckets():
  assert scoring.truncate([1, 2, 3, 4], [5, 6], 4) == ([3, 4], [5, 6])
  with pytest.raises(scoring.ScoringError, match="does not fit"):
    scoring.truncate([], list(range(5)), 4)
  ids = list(range(10, 31))                          # 21 tokens, context 8, stride 3
  text = [2] + ids
  pairs = scoring.rolling_pairs([2], ids, 8, stride=3)
  assert [t for _, cont in pairs for t in cont] == ids          # each token exactly once
  assert pairs[0] == ([2], ids[:7]) and [len(c) for _, c in pairs] == [7, 3, 3, 3, 3, 2]
  for context, continuation in pairs[1:]:
    start = text.index(continuation[0])
    assert context == text[start - len(context):start]         # the text just before it ...
    assert len(context) + len(continuation) == 8                # ... as much as fits
  assert [scoring.bucket(n, 128) for n in (1, 16, 17, 33, 100, 128)] == [16, 16, 32, 64, 128, 128]
  assert scoring.bucket(50, 40) == 48
