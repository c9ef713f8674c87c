"""Evaluation: bits per byte, the built-in scorers, the lm-eval adapter, in-training evaluation.

  bpb.py          held-out loss, perplexity and bits per byte on any corpus the data stage reads
  loglik.py       (context, continuation) -> scored tokens; KV-cache batched scoring; completions
  pool.py         where work units run: this process or a pool of Ray actors
  tasks.py        built-in task files: multiple choice and generation jsonl, checked by line
  scorers.py      acc / acc_norm and exact match / contains, with standard errors
  harness.py      `--model raylm` for lm-evaluation-harness (imports lm_eval)
  harness_cli.py  lm-eval's command line with the model registered
  in_training.py  the built-in suite inside `fit` (eval.every)
  results.py      results.json and results.md
  run.py          `raylm eval`
"""
