"""An lm-evaluation-harness model for evo_jax runs, registered as `evo_jax`.

    lm_eval --model evo_jax --model_args workdir=DIR,policy=verify --tasks hellaswag [...]

works once evo_jax is installed: evo_jax/lm_eval_plugin.py registers this class with lm-eval
(0.4.13 has no plugin discovery of its own). Without an install, `python -m evo_jax.harness`
takes the same arguments: it imports this module, whose decorator registers the model, and
hands the command line to lm_eval's own `cli_evaluate`. From Python, `import evo_jax.harness`
and pass `model="evo_jax"` (or an `EvoLM` instance) to `lm_eval.simple_evaluate`.

model_args: workdir (required), policy (ar | ar_clean | verify | diffusion | block | evo;
default verify), batch_size, seed, temperature (used when a request samples), top_p,
max_gen_toks (default 256, at most half the model's context, as in `evaluate`), and any
setting of the policy (window=8, gamma=0.5, ...).

- loglikelihood: the AR-path log-likelihood (evo_jax/scoring.py) of each continuation, tokenised
  as `evaluate --task choice` does ([bos] + context, continuation), with its greedy flag;
- loglikelihood_rolling: a document's tokens after [bos], each scored once in windows that keep
  as much context as fits (scoring.rolling_pairs);
- generate_until: the decoding loop under the chosen policy, up to max_gen_toks new tokens, cut
  before the first of the request's `until` strings.
"""
import importlib
import sys

from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from evo_jax import backend
from evo_jax import decoding
from evo_jax import evaluate
from evo_jax import run as run_lib
from evo_jax import scoring

# The built-in models first: lm_eval's get_model loads them only into an empty registry.
importlib.import_module("lm_eval.models")


@register_model("evo_jax")
class EvoLM(LM):

  def __init__(self, workdir, policy="verify", batch_size=16, seed=0, temperature=0.0, top_p=1.0,
               max_gen_toks=256, max_batch_size=None, device=None, **policy_settings):
    del max_batch_size, device        # lm_eval passes them to every model; one device here
    super().__init__()
    backend.choose_platform()       # lm_eval's own command line does not go through cli.command
    self.policy = decoding.make_policy(policy, **policy_settings)
    self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16   # "auto" -> 16
    self.seed, self.temperature, self.top_p = int(seed), float(temperature), float(top_p)
    self.max_gen_toks = int(max_gen_toks)
    self.run = run_lib.load_run(workdir)
    self.tokenizer = self.run.tokenizer
    self.scorer = scoring.Scorer(self.run.model, self.run.params, self.run.context,
                                 self.batch_size, self.seed)

  @property
  def tokenizer_name(self):
    return self.tokenizer.path

  def loglikelihood(self, requests, disable_tqdm=False):
    pairs = [evaluate.encode_pair(self.tokenizer, *req.args) for req in requests]
    return [(s.logprob, s.is_greedy) for s in self.scorer.score(pairs)]

  def loglikelihood_rolling(self, requests, disable_tqdm=False):
    tok, L = self.tokenizer, self.run.context
    pairs, owner = [], []
    for r, req in enumerate(requests):
      for pair in scoring.rolling_pairs([tok.bos_id], tok.encode(req.args[0]), L):
        pairs.append(pair)
        owner.append(r)
    totals = [0.0] * len(requests)
    for r, s in zip(owner, self.scorer.score(pairs)):
      totals[r] += s.logprob
    return totals

  def generate_until(self, requests, disable_tqdm=False):
    """Requests with the same settings share batches; answers come back in request order."""
    groups, notices = {}, set()
    for i, req in enumerate(requests):
      context, gen_kwargs = req.args
      kwargs = dict(gen_kwargs or {})
      until = kwargs.get("until") or []
      until = (until,) if isinstance(until, str) else tuple(until)
      # Greedy unless the request samples: then its temperature, else ours, else 1.
      sample = kwargs.get("do_sample", False) or float(kwargs.get("temperature") or 0.0) > 0
      temperature = float(kwargs.get("temperature") or self.temperature or 1.0) if sample else 0.0
      # As evaluate's tasks: a length longer than half the context is capped, with a notice.
      max_toks = evaluate.generation_length(
          None, int(kwargs.get("max_gen_toks", self.max_gen_toks)), self.run.context,
          log=notices.add)
      groups.setdefault((until, temperature, max_toks), []).append((i, context))
    for notice in sorted(notices):        # once per length, not once per request
      print(notice, file=sys.stderr)
    out = [None] * len(requests)
    for (until, temperature, max_toks), items in groups.items():
      completions, _ = evaluate.complete(
          self.run, [c for _, c in items], self.policy, max_new_tokens=max_toks,
          temperature=temperature, top_p=self.top_p, seed=self.seed,
          batch_size=self.batch_size, stops=until)
      for (i, _), c in zip(items, completions):
        out[i] = c.text
    return out


def main():
  cli_evaluate()


if __name__ == "__main__":
  main()
