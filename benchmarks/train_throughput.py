"""(b) PEFT training throughput: tokens/s and model-FLOPs utilization (MFU) against the H100's bf16 dense peak.

Two measurements per (model, method), each on a fresh copy of the random-initialised base model with the method
applied by the harness (:func:`harness.methods.apply_method`, paper-preset settings, the method's own optimizer
from :func:`harness.training.make_optimizer`):

- ``synthetic``: eager, ``train()``'s own step (:func:`harness.training.training_step`: float32 masters, gradient
  clipping at the settings' ``max_grad_norm``, one device read of loss and norm, the optimizer of
  :func:`harness.training.make_optimizer`, fused on CUDA as ``train()`` does) on the fixed shape of the target,
  batch ``--batch`` x ``--seq`` random tokens, causal-LM loss at every position (transformers' loss) through
  :func:`harness.training.training_forward` (``use_cache=False``, as every training forward); for an
  encoder-decoder (``random:t0-3b``) ``--seq`` random encoder tokens and ``--dec-seq`` random decoder labels per
  row, the loss at every decoder position. ``--steps`` timed steps after ``--warmup`` untimed ones. Until issue 14 this was a step of its own (unfused optimizer, clipping at
  1, and the model called with its KV cache on, which made the compiled blocks recompile per layer).
- ``compiled``: the synthetic step as ``--compile on`` trains: the transformer blocks compiled by
  :func:`harness.compiling.compile_blocks` (regional ``torch.compile``, dynamic shapes);
  ``compiled_model``: the whole model under ``torch.compile`` (``--compile model``).
- ``harness``: the harness's own T-Few training loop (:func:`harness.training.train` with ``--compile on``: compiled
  blocks) on the task's few-shot set (all choices of a batch of 8 examples per step, logits only where a choice
  is scored), ``--harness-warmup`` + ``--harness-steps`` steps in one call; the step rate is over the last
  ``--harness-steps`` (the first step includes compiling, reported apart); tokens counted without padding, as
  the harness records them. ``harness_eager``, ``harness_model``: the same loop with ``--compile off`` (the
  default) and ``--compile model``.

Model FLOPs (standard accounting, no recomputation; :func:`harness.costs.matmul_flops` and ``attention_flops``):
forward = 2 N_body per token (encoder-decoder: encoder weights per encoder token, decoder weights per decoder
token, cross-attention K/V per encoder state and decoder row) + attention (4 h d_h keys per layer) + 2 d V per
projected position; backward = activation gradients (the forward's matmul
FLOPs again, attention twice) + weight gradients (2 x trainable matmul parameters per token; for full
fine-tuning the whole body and the output projection). Full fine-tuning is thus 6N per token, frozen-base methods
about 4N. MFU = model FLOPs / seconds / 989.4 TFLOP/s (H100 SXM bf16 dense).

    python -m benchmarks.train_throughput --device cuda --data-dir .benchdata/data --out $OUT/train.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from benchmarks.common import model_id
from benchmarks.common import (H100_BF16_PEAK, Timer, environment, peak_bytes, peak_reset, print_table, profile,
                               write_json)
from harness import costs
from harness.data import few_shot_examples, resolve_data_dir
from harness.seq2seq import record_work
from harness.methods import apply_method, method_overhead, training_settings
from harness.methods.base import per_token_flops
from harness.models import load_model
from harness.tasks import load_task
from harness.compiling import compile_mode, for_training, uncompile_blocks
from harness.master_weights import MasterWeights
from harness.training import make_optimizer, train, training_forward, training_step

GIB = 2**30


def model_flops(dims: costs.ModelDims, work: costs.Work, trainable_body: int, full: bool) -> float:
    """Training FLOPs of the forward passes ``work`` describes (see the module docstring): the forward's matmuls
    and attention as :mod:`harness.costs` counts them (encoder-decoders and sliding windows included), the
    activation-gradient backward (matmuls again, attention twice), weight gradients (full fine-tuning: every
    matmul weight; else 2 x the trainable parameters per token)."""
    matmul = costs.matmul_flops(dims, work)
    attn = costs.attention_flops(dims, work)
    weight_grads = matmul if full else 2 * trainable_body * work.tokens
    return 2 * matmul + 3 * attn + weight_grads


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def compiled(base, tokenizer, method: str, args, device) -> dict:
    """The synthetic step with compiled blocks (``--compile on``), fused optimizer."""
    return synthetic(base, tokenizer, method, args, device, compile="on")


def compiled_model(base, tokenizer, method: str, args, device) -> dict:
    """The synthetic step with the whole model compiled (``--compile model``), fused optimizer."""
    return synthetic(base, tokenizer, method, args, device, compile="model")


def synthetic(base, tokenizer, method: str, args, device, compile: str = "off") -> dict:
    settings = training_settings(method, "paper", {"steps": args.steps + args.warmup})
    model = apply_method(copy.deepcopy(base), method, settings)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    masters = MasterWeights(params)  # as train() does (float32 masters of bfloat16 trainable parameters)
    optimizer = make_optimizer(masters.params, settings, fused=device.type == "cuda")  # as train() does
    dims = costs.ModelDims.from_model(model)
    overhead = method_overhead(model, method, settings)
    trainable = trainable_count(model)
    model, blocks = for_training(model, compile_mode(compile))  # as train() does
    gen = torch.Generator(device="cpu").manual_seed(0)
    vocab_in = min(len(tokenizer), dims.vocab)  # ids of the tokenizer actually used
    seq2seq = bool(dims.enc_params)  # encoder-decoder: --seq encoder tokens, --dec-seq decoder tokens per row
    dec = args.dec_seq if seq2seq else args.seq
    batches = [(torch.randint(0, vocab_in, (args.batch, args.seq), generator=gen).to(device),
                torch.randint(0, vocab_in, (args.batch, dec), generator=gen).to(device)) for _ in range(4)]

    def step(xy):  # train()'s step (harness.training.training_step), LM loss on the fixed-shape batch
        x, y = xy
        y = y if seq2seq else x  # causal: the loss at every position of the input

        def backward():
            loss = training_forward(model, input_ids=x, labels=y).loss  # use_cache=False, as train()'s forwards
            loss.backward()
            return loss.detach().float().reshape(1, 1), [1.0]

        return training_step(backward, optimizer, masters, settings)[1]

    for i in range(args.warmup):
        step(batches[i % len(batches)])
    peak_reset(device)
    times = []
    for i in range(args.steps):
        with Timer(device) as t:
            step(batches[i % len(batches)])
        times.append(t.seconds)
    n = args.seq + overhead.virtual_tokens  # positions per (encoder) row
    work = _work(dims, args.batch, n, dec if seq2seq else 0)
    tokens = work.tokens
    full = method == "full"
    flops = model_flops(dims, work, trainable, full) + 3 * per_token_flops(overhead, work)
    sec = statistics.median(times)
    out = {"kind": {"off": "synthetic", "on": "compiled", "model": "compiled_model"}[compile], "method": method, "batch": args.batch,
           "seq": args.seq, "dec_seq": dec if seq2seq else None, "steps": args.steps,
           "step_ms": sec * 1e3, "tokens_per_s": tokens / sec, "model_tflops": flops / sec / 1e12,
           "mfu": flops / sec / H100_BF16_PEAK, "trainable_params": trainable,
           "peak_gib": (peak_bytes(device) or 0) / GIB, "optimizer": settings["optimizer"],
           "harness_train_flops_per_step": costs.train_flops(dims, work, trainable)}
    if args.profile and method in ("lora", "full"):
        out["profile"] = profile(lambda: step(batches[0]), device)
    uncompile_blocks(blocks)
    del model, optimizer, masters
    return out


def _work(dims: costs.ModelDims, batch: int, n: int, dec: int) -> costs.Work:
    """The synthetic batch's work: ``batch`` causal rows of ``n`` tokens, logits everywhere; encoder-decoder
    (``dec`` > 0): ``n`` encoder tokens and ``dec`` decoder tokens per row (:func:`harness.seq2seq.record_work`)."""
    w = costs.Work()
    for _ in range(batch):
        if dec:
            record_work(w, n, 0, encode=True)
            record_work(w, n, dec, encode=False)
        else:
            w.add_tokens(n, 0, dims.windows)
            w.logit_positions += n
    return w


def harness_loop(base, tokenizer, method: str, args, device, compile: str = "on") -> dict:
    task = load_task(args.task)
    examples = few_shot_examples(task, 0, resolve_data_dir(args.data_dir))  # default: the embedded data
    warm = max(args.harness_warmup, 1)
    settings = training_settings(method, "paper", {"steps": warm + args.harness_steps})
    model = apply_method(copy.deepcopy(base), method, settings)
    dims = costs.ModelDims.from_model(model)
    peak_reset(device)
    stats = train(model, tokenizer, examples, task, settings, seed=0, method=method, compile=compile)
    sec = sum(stats.step_seconds[warm:])
    tokens = sum(stats.step_tokens[warm:])
    share = tokens / max(stats.work.tokens, 1)  # the timed steps' share of the work (keys, logits, rows)
    trainable = trainable_count(model)
    prof = None
    if args.profile:  # 3 more steps under the profiler: wall vs GPU kernel time of the harness's own loop
        prof = profile(lambda: train(model, tokenizer, examples, task, training_settings(method, "paper", {"steps": 3}),
                                     seed=2, method=method, compile=compile), device, reps=1)
        prof = prof | {"wall_ms": prof["wall_ms"] / 3, "kernel_ms": prof["kernel_ms"] / 3,
                       "launches": prof["launches"] / 3, "note": "per step, compile of a fresh graph included"}
    w = stats.work
    flops = share * (model_flops(dims, w, trainable, method == "full")
                     + stats.overhead_flops)
    n = args.harness_steps
    del model
    kind = {"on": "harness", "off": "harness_eager", "model": "harness_model"}[compile]
    return {"kind": kind, "method": method, "steps": n, "step_ms": sec / n * 1e3, "compiled": stats.compiled,
            "first_step_s": stats.step_seconds[0], "warmup_s": sum(stats.step_seconds[:warm]),
            "tokens_per_s": tokens / sec, "model_tflops": flops / sec / 1e12, "mfu": flops / sec / H100_BF16_PEAK,
            "trainable_params": trainable, "peak_gib": (peak_bytes(device) or 0) / GIB,
            "tokens_per_step": tokens / n, "optimizer": settings["optimizer"]} | ({"profile": prof} if prof else {})


def harness_eager(base, tokenizer, method, args, device) -> dict:
    return harness_loop(base, tokenizer, method, args, device, compile="off")


def harness_model(base, tokenizer, method, args, device) -> dict:
    return harness_loop(base, tokenizer, method, args, device, compile="model")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="llama-1b,qwen2.5-0.5b,smollm2-135m")
    p.add_argument("--methods", default="lora,ia3,prompt_tuning,full")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dec-seq", type=int, default=32, help="decoder tokens per row of encoder-decoder models")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--harness-steps", type=int, default=30, help="timed steps of the harness loop")
    p.add_argument("--kinds", default="synthetic,harness", help="synthetic, compiled, compiled_model, harness, harness_eager (module docstring)")
    p.add_argument("--harness-warmup", type=int, default=5, help="untimed harness-loop steps first")
    p.add_argument("--task", default="rte")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--profile", action="store_true", help="kernel profile of lora and full (first model)")
    p.add_argument("--out", default="benchmarks/results/train.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    rows = []
    for i, name in enumerate(args.models.split(",")):
        lm = load_model(model_id(name), args.device, args.dtype)
        base = lm.model
        for method in args.methods.split(","):
            prof = args.profile
            args.profile = prof and i == 0
            kinds = {"synthetic": synthetic, "compiled": compiled, "compiled_model": compiled_model,
                     "harness": harness_loop, "harness_eager": harness_eager, "harness_model": harness_model}
            for fn in (kinds[k] for k in args.kinds.split(",")):
                try:
                    r = fn(base, lm.tokenizer, method, args, device)
                except Exception as exc:  # noqa: BLE001 - recorded (out of memory, a compile failure), others go on
                    r = {"kind": fn.__name__, "method": method, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                rows.append({"model": name, "dtype": str(lm.dtype).removeprefix("torch.")} | r)
                print(f"# {name} {method} {r.get('kind')}: {r.get('tokens_per_s', 0):.0f} tok/s, "
                      f"MFU {r.get('mfu', 0):.3f}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            args.profile = prof
        del lm, base
        write_json(args.out, {"env": env, "args": vars(args),
                              "results": rows})
    print_table(rows, ["model", "kind", "method", "step_ms", "tokens_per_s", "model_tflops", "mfu", "peak_gib",
                       "first_step_s", "trainable_params", "optimizer", "error"])


if __name__ == "__main__":
    main()
