"""Decoding from a trained run (method.md section 5; the loop: evo_jax/decoding.py).

    python -m evo_jax.sample --workdir DIR --policy {ar,ar_clean,verify,diffusion,block,evo}
        --prompt TEXT [--prompts_file FILE] [--max_new_tokens N] [--temperature T] [--top_p P] [--seed S]
        [--json] [--trajectory FILE.png] [--policy.SETTING=VALUE ...]

Each prompt is encoded as [bos] + its tokens; all prompts are decoded together in one batch.
--prompts_file: one prompt per line, or for a .jsonl file one JSON string (or object with a
"prompt" field) per line, so that prompts can hold newlines. --policy.SETTING=VALUE changes one
setting of the policy (evo_jax/decoding.py, `Policy`), e.g. --policy.window=16 --policy.gamma=0.8.
--json prints one JSON object per prompt; --trajectory draws t of every token at every iteration
as a PNG heatmap (one file per prompt: FILE.png, or FILE-1.png, FILE-2.png, ...).
"""
import dataclasses
import json
import os
import sys

from evo_jax import cli
from evo_jax import decoding
from evo_jax import files
from evo_jax import run as run_lib
from evo_jax.errors import UserError


def read_prompts(args):
  """The prompt texts, from --prompt and/or --prompts_file; an empty one is an error."""
  prompts = []
  if args.prompt is not None:
    if not args.prompt:
      raise UserError("empty prompt")
    prompts.append(args.prompt)
  if args.prompts_file:
    lines = files.read_text(args.prompts_file, "prompts file").splitlines()
    for n, line in enumerate(lines, start=1):
      if not line.strip():
        continue
      if args.prompts_file.endswith(".jsonl"):
        try:
          value = json.loads(line)
        except ValueError:
          raise UserError(f"{args.prompts_file} line {n}: not valid JSON") from None
        value = value.get("prompt") if isinstance(value, dict) else value
        if not isinstance(value, str):
          raise UserError(f"{args.prompts_file} line {n}: expected a string or a \"prompt\" field")
        line = value
      if not line:
        raise UserError(f"{args.prompts_file} line {n}: empty prompt")
      prompts.append(line)
  if not prompts:
    raise UserError("no prompt: give --prompt TEXT or --prompts_file FILE")
  return prompts


def trajectory_paths(path, n):
  if n == 1:
    return [path]
  stem, ext = os.path.splitext(path)
  return [f"{stem}-{i + 1}{ext or '.png'}" for i in range(n)]


def main(argv=None):
  with cli.command():
    parser = cli.OneLineParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a trained run (checkpoints, config)")
    parser.add_argument("--policy", default="verify", help=" | ".join(decoding.POLICIES))
    parser.add_argument("--prompt", help="the text to continue")
    parser.add_argument("--prompts_file", help="one prompt per line (.jsonl: JSON strings)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt")
    parser.add_argument("--trajectory", help="draw t by position and iteration to this PNG")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    policy = cli.parse_policy(args.policy, rest)  # cheap checks first, before loading the run
    texts = read_prompts(args)

    run = run_lib.load_run(args.workdir)
    run.check_policy(policy)
    tokenizer = run.tokenizer
    prompts = [[tokenizer.bos_id] + tokenizer.encode(text) for text in texts]
    samples = decoding.generate(
        run.model, run.params, run.schedule, prompts, policy,
        max_new_tokens=args.max_new_tokens, context=run.context, eos_id=tokenizer.eos_id,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        record=bool(args.trajectory))
    if args.trajectory:
      for i, (path, s) in enumerate(zip(trajectory_paths(args.trajectory, len(texts)), samples)):
        decoding.plot_trajectory(s.trajectory, path, f"policy {policy.name}, prompt {i + 1}: "
                                f"{len(s.tokens)} tokens in {s.nfe} forward passes")
    for text, s in zip(texts, samples):
      completion = tokenizer.decode(s.tokens)
      if args.json:
        print(json.dumps({
            "prompt": text, "text": completion, "tokens": s.tokens, "policy": policy.name,
            "settings": dataclasses.asdict(policy), "nfe": s.nfe,
            "tokens_per_forward": s.tokens_per_forward, "tokens_per_sec": s.tokens_per_sec,
            "stop_reason": s.stop_reason, "seconds": s.seconds}))
      else:
        print(f"{text}{completion}")
        print(f"-- policy {policy.name} | {len(s.tokens)} tokens | NFE {s.nfe} | "
              f"{s.tokens_per_forward:.2f} tokens/forward | {s.tokens_per_sec:,.0f} tokens/s "
              f"(batch) | stop: {s.stop_reason}")


if __name__ == "__main__":
  main()
