"""Mixed-task serving (issue 16): one stream of queries from several tasks, scored in batches whose rows belong to
different tasks, each row with its own task's trained parameters or demonstrations.

- :mod:`harness.mixed.serving`: how a batch's rows get their task's parameters, per method (ICL: the task's
  cached demonstration prefix; (IA)3: stacked [N, d] vectors gathered per row by forward hooks; LoRA: peft's
  ``adapter_names``; prompt tuning: the task's soft prompt as a cached per-row prefix);
- :mod:`harness.mixed.scorer`: the mixed-batch scorer (rank classification as :mod:`harness.scoring`);
- :mod:`harness.mixed.plan`: which finished runs of the store are served, checked before any model loads;
- :mod:`harness.mixed.modes`: the serving modes, timed (mixed, task by task, merged);
- :mod:`harness.mixed.execute`: a checked plan served in every mode, one ``mixed_runs`` row per method and mode
  (:mod:`harness.mixed.records`);
- :mod:`harness.mixed.api`: ``run_mixed``, the Python API of ``harness mixed``; :mod:`harness.mixed.command`: the
  click command.
"""
