"""Mixed-task serving (issue 16): one stream of queries from several tasks, scored in batches whose rows belong to
different tasks, each row with its own task's trained parameters or demonstrations.

- :mod:`harness.mixed.serving`: how a batch's rows get their task's parameters, per method (ICL: the task's
  cached demonstration prefix; (IA)3: stacked [N, d] vectors gathered per row by forward hooks; LoRA: peft's
  ``adapter_names``; prompt tuning: the task's soft prompt as a cached per-row prefix);
- :mod:`harness.mixed.scorer`: the mixed-batch scorer (rank classification as :mod:`harness.scoring`);
- :mod:`harness.mixed.api`: ``harness mixed``: adapters of finished runs from the store, mixed vs task-by-task vs
  merged serving timed, one ``mixed_runs`` row per method and mode.
"""
