"""Calibrated accuracies of an in-context run (``--calibrate``): contextual calibration and mutual information.

- ``accuracy_calibrated``: contextual calibration (Zhao et al. 2021, "Calibrate Before Use", arXiv 2102.09690).
  The content-free inputs ``"N/A"``, ``""`` and ``"[MASK]"`` go through the run's own prompt: the same
  demonstrations and template, every input field of the example replaced by the content-free string (all string
  fields except the id, the label and the choices fields; the paper replaces every input of a multi-input task).
  Per content-free input the choices' probabilities are normalized over the choices (softmax of the summed
  log-probs); their mean, normalized again, is ``p_cf``. A prediction is ``argmax_c p(c|x) / p_cf(c)``, i.e. the
  paper's ``W = diag(p_cf)^-1``, ``b = 0``, which is ``argmax_c log p(c|x) - log p_cf(c)``. Choices are whole
  answer strings scored by their summed log-probability (the paper used the first token's probability of
  single-token label words). It needs one label space for all examples: a task with per-example choices
  (COPA) or partial scoring (a context per choice) gets ``None`` and the reason in ``calibration_skipped``.
- ``accuracy_mutual_info``: lm-evaluation-harness's ``acc_mutual_info`` (``lm_eval/api/task.py``):
  ``argmax_c log p(c|context) - log p(c)`` where ``log p(c)`` is the log-likelihood of the continuation
  ``target_delimiter + choice`` after an empty context, i.e. after the one prefix token lm-eval's HF model uses
  (BOS, else EOS). No demonstrations: the unconditional request is ``("", " choice")``.

Both are recorded beside the run (``extra_json``) with what is needed to recompute them by hand: the per-choice
log-probs of each content-free prompt (``calibration.content_free``), ``p_cf``, and the unconditional log-probs
per continuation string (``calibration.unconditional``). Their extra forward passes are counted in
``calibration_flops_per_example`` (docs/metrics.md), never in ``infer_flops_per_example``.
"""

from __future__ import annotations

import math

from harness import costs
from harness.scoring import Row, argmax_first, score_naive, score_prompts
from harness.tokenization import _encode

CONTENT_FREE = ("N/A", "", "[MASK]")


def content_free_example(task, example: dict, text: str) -> dict:
    """``example`` with every input field (strings other than the id, label and choices fields) set to ``text``."""
    keep = {task.id_field, task.label_field}
    choices_field = task.choices_field
    if isinstance(choices_field, str):
        keep.add(choices_field)
    elif choices_field:
        keep.update(choices_field)
    return {key: (text if isinstance(value, str) and key not in keep else value) for key, value in example.items()}


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def p_content_free(cf_logprobs: list[list[float]]) -> list[float]:
    """Zhao et al.'s ``p_cf``: the mean over content-free inputs of the choice probabilities normalized over the
    choices, normalized again."""
    probs = [_softmax(lps) for lps in cf_logprobs]
    mean = [sum(col) / len(probs) for col in zip(*probs)]
    total = sum(mean)
    return [m / total for m in mean]


def calibrated_prediction(logprobs: list[float], p_cf: list[float]) -> int:
    """``argmax_c p(c|x) / p_cf(c)`` (ties to the lowest index)."""
    return argmax_first([lp - math.log(p) for lp, p in zip(logprobs, p_cf)])


def mutual_info_prediction(logprobs: list[float], unconditional: list[float]) -> int:
    """lm-eval's ``acc_mutual_info`` prediction: ``argmax_c log p(c|x) - log p(c)``."""
    return argmax_first([lp - u for lp, u in zip(logprobs, unconditional)])


def unconditional_logprobs(model, tokenizer, continuations: list[str], batch_size: int = 8):
    """``{continuation: log p(continuation | prefix token)}`` as lm-eval scores ``("", continuation)``, and the
    :class:`~harness.costs.Work` of it."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    unique = list(dict.fromkeys(continuations))
    rows = [Row([prefix], [_encode(tokenizer, text)]) for text in unique]
    dims = costs.ModelDims.from_model(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores, work = score_naive(model, rows, batch_size, dims, pad)
    return {text: s[0] for text, s in zip(unique, scores)}, work


def calibrate(lm, task, template, examples: list[dict], prompts, prefix: str, scored, *, use_cache: bool,
              batch_size: int = 8, reuse=None) -> dict:
    """The calibration metrics of one scored run (``scored``: its :class:`~harness.scoring.ScoreOutput`): a dict
    of metrics and the ``calibration`` record (module docstring)."""
    dims = costs.ModelDims.from_model(lm.model)
    n = max(len(scored.examples), 1)
    work = costs.Work()
    record: dict = {"content_free_inputs": list(CONTENT_FREE)}
    out: dict = {}
    # mutual information (lm-eval): one unconditional score per distinct continuation string
    unconditional, uwork = unconditional_logprobs(lm.model, lm.tokenizer,
                                                  [c for p in prompts for c in p.choices], batch_size)
    work.add(uwork)
    record["unconditional"] = unconditional
    mi = [mutual_info_prediction(ex.logprobs, [unconditional[c] for c in p.choices])
          for ex, p in zip(scored.examples, prompts)]
    out["accuracy_mutual_info"] = sum(pred == ex.label for pred, ex in zip(mi, scored.examples)) / n
    # contextual calibration: needs one label space
    choice_sets = {p.choices for p in prompts}
    if any(p.partial for p in prompts) or len(choice_sets) != 1:
        out["accuracy_calibrated"] = None
        out["calibration_skipped"] = ("partial scoring" if any(p.partial for p in prompts)
                                      else "per-example choices: contextual calibration needs one label space")
    else:
        cf_prompts = [task.render(template, content_free_example(task, examples[0], text)) for text in CONTENT_FREE]
        cf = score_prompts(lm.model, lm.tokenizer, cf_prompts, prefix, use_cache=use_cache, batch_size=batch_size,
                           reuse=reuse if reuse is not None else scored.cache)
        work.add(cf.work)
        cf_logprobs = [ex.logprobs for ex in cf.examples]
        p_cf = p_content_free(cf_logprobs)
        record["content_free"] = cf_logprobs
        record["p_cf"] = p_cf
        preds = [calibrated_prediction(ex.logprobs, p_cf) for ex in scored.examples]
        out["accuracy_calibrated"] = sum(pred == ex.label for pred, ex in zip(preds, scored.examples)) / n
    out["calibration_flops_per_example"] = costs.forward_flops(dims, work) / n
    out["calibration"] = record
    return out
