"""Every method's inference FLOPs formula (its :class:`harness.methods.base.Overhead`, turned into FLOPs by
:func:`harness.peft_runner.eval_overhead_flops`) against torch's ``FlopCounterMode`` (issue 13, item 3).

Model: a tiny random llama (2 layers, d=64, 4 heads / 2 KV heads, MLP 128, vocab 256, q/k/v/o and MLP biases so
that BitFit applies) with eager attention, so the attention matmuls are visible to the counter. For each method the
forward of 1 and of 3 rows of 32 tokens is counted on the base model and on the model with the method applied
(eval mode, every trainable tensor nudged off its initial value so nothing is an exact identity). The difference is
split into a part per row (the slope between the two batches) and a part per forward call (the intercept):

- per row: compared with the formula for one example of 32 tokens: they agree exactly (:data:`TOLERANCE`);
- per forward call: compared with the formula's ``Overhead.per_forward`` (0 for most methods; the
  input-independent work a method redoes on every call, :data:`PER_FORWARD`): they agree exactly too, once its
  elementwise part is taken out (:data:`PER_FORWARD_ELEMENTWISE`).

What the counter cannot see, and what it sees that the formulas leave out (each applied to the formula's value
before comparing; module docstring of each method for the formulas):

- ``FlopCounterMode`` counts matmul-like ops only (mm, addmm, bmm, convolutions, attention kernels), not
  elementwise ones. Formulas count elementwise terms where they are part of the method: (IA)^3's scalings (its
  whole overhead, so the counted difference is 0), DoRA's magnitude (``d_out``), AdaLoRA's ``E`` (``r``), VeRA's
  ``d`` and ``b`` (``r + d_out``), all per adapted layer and token (:data:`ELEMENTWISE`); the virtual tokens'
  own forward at ``2 N_body`` per token, whose norms and biases (in ``N_body``) are elementwise; and per forward
  call DoRA's weight norm, OFT's Neumann sums and constrained OFT's projection (peft's ``_project_batch``:
  differences, a Frobenius norm, a division, a scaling), Compacter's Kronecker products
  (:data:`PER_FORWARD_ELEMENTWISE`).
  nn.LSTM (p-tuning's LSTM prompt encoder) runs on the CPU as one fused oneDNN op per layer
  (``aten.mkldnn_rnn_layer``; cuDNN's ``aten._cudnn_rnn`` on CUDA), for which the counter has no formula: it
  would count 0. :func:`counted` therefore turns oneDNN off, so the LSTM runs as torch's own cell loop, ``addmm``
  per step, which the counter sees (the model's other ops are the same with oneDNN on or off).
- Eager attention multiplies the whole ``T x T`` score rectangle, masked entries included; the formulas count
  the causal triangle. This cancels between base and method except for virtual tokens (prompt tuning, p-tuning),
  which lengthen the sequence: their masked entries are added to the formula's value. Prefix keys are visible
  to every token, so prefix methods need no such correction.
- peft's prefix tuning runs its MLP reparameterization for every row (``prompt_encoder`` on the expanded prompt
  tokens), also in eval mode; the formula counts it in training only (``train_per_row``: a deployed prefix is
  computed once). The counted figure is compared with formula + ``train_per_row``.

Methods whose change is merged (or is a change of the weights themselves) add nothing the counter sees: ``full``,
``bitfit``, ``ln_tuning`` (peft's copies of the norms), ``fishmask`` (a sparse-delta parametrization recomputed
per call, elementwise), and ``intrinsic_said`` after :func:`harness.methods.intrinsic_said.merge` (its unmerged
training hooks are matrix-vector products, ``aten.mv``, which ``FlopCounterMode`` does not count, so they are not
checked here). ``qlora`` needs a 4-bit NF4 base (CUDA + bitsandbytes) and is skipped.

Besides each method's paper settings, :data:`VARIANTS` checks settings that change the per-call work: constrained
OFT (``coft=True``) and p-tuning's LSTM prompt encoder (``encoder="lstm"``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from harness import costs
from harness.compat import is_prompt_learning, peft_legacy_calls
from harness.errors import HarnessError
from harness.methods import apply_method, list_methods, method_overhead, training_settings
from harness.methods.base import matched_linears, resolve_targets
from harness.peft_runner import eval_overhead_flops

TOKENS = 32  # tokens per row
ROWS = (1, 3)  # two batch sizes: their difference separates per-row from per-forward FLOPs
# Counted and predicted FLOPs are integers and agree exactly for every method on this model. A relative bound such
# as 2% would hide real errors here: one prefix key fewer in mam's 30 changes its per-row figure by 1.6%.
TOLERANCE = 0.0
METHODS = [m.name for m in list_methods() if m.kind == "peft"]


def _adapted(model, method: str, settings: dict, roles) -> list[tuple[str, int, int]]:
    """(name, d_in, d_out) of the layers ``method`` adapts."""
    return matched_linears(model, resolve_targets(model, roles, settings["targets"], method))


def _elementwise_ia3(model, method, settings):
    return method_overhead(model, method, settings).per_token  # every scaling is elementwise


# Elementwise FLOPs per token that a formula includes and FlopCounterMode cannot see (see the module docstring).
ELEMENTWISE = {
    "ia3": _elementwise_ia3,
    "tfew": _elementwise_ia3,
    "dora": lambda model, method, settings: sum(
        d_out for _, _, d_out in _adapted(model, method, settings, ("q", "v"))),  # magnitude rescaling
    "adalora": lambda model, method, settings: settings["init_r"] * len(
        _adapted(model, method, settings, ("q", "k", "v", "o", "ffn_in", "ffn_out"))),  # * E
    "vera": lambda model, method, settings: sum(
        settings["r"] + d_out for _, _, d_out in _adapted(model, method, settings, ("q", "v"))),  # * d, * b
}

# Input-independent work peft / our modules redo on every forward call (counted once per call, whatever the rows):
PER_FORWARD = {
    # peft (ENABLE_DORA_CACHING off by default) rebuilds B A through lora_B(lora_A(eye(d_in))) for the weight norm
    "dora": "B A from the identity, for the weight norm: 2 r d_in (d_in + d_out) per adapted layer",
    "oft": "the Cayley-Neumann series of every rotation block (bmm); with coft, first its projection (elementwise)",
    "compacter": "the PHM weights' W_left @ W_right (bmm), 2 d_in d_out / n per PHM layer",
    "ptuning": "the prompt encoder (MLP or LSTM + MLP), once per forward (peft repeats its output over the rows)",
}


def _phm_elementwise(model, method, settings):
    """Compacter: per site, down (d -> m) and up (m -> d) PHM weights, each n products A_i kron W_i and their sum:
    (2n - 1) d m elementwise per PHM layer."""
    d, n = model.config.hidden_size, settings["n"]
    m = -(-max(1, d // settings["reduction"]) // n) * n
    return model.config.num_hidden_layers * 2 * (2 * n - 1) * d * m


# Elementwise FLOPs per forward call that the per-call formula includes and FlopCounterMode cannot see.
PER_FORWARD_ELEMENTWISE = {
    # W + s B A, the row norms (squares, sums), m / norm (roots, divisions)
    "dora": lambda model, method, settings: sum(
        4 * d_in * d_out + 2 * d_out for _, d_in, d_out in _adapted(model, method, settings, ("q", "v"))),
    # per block of b: S - S^T, then I + 2S + 2S^2 + 2S^3 + S^4 (5 Neumann terms): 8 b^2; with coft also the
    # projection: S - S^T, (S - Z) twice, the norm (b^2 squares, b^2 - 1 sums, a root), / norm, * eps, Z +: 8 b^2
    "oft": lambda model, method, settings: sum(
        d_in // settings["block_size"] * (16 if settings["coft"] else 8) * settings["block_size"] ** 2
        for _, d_in, _ in _adapted(model, method, settings, ("q", "v"))),
    "compacter": _phm_elementwise,
}


def tiny_llama():
    """The test model (module docstring), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.set_attn_implementation("eager")  # attention as matmuls the counter sees
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


def counted(model, rows: int) -> int:
    """FlopCounterMode's FLOPs of one forward of ``rows`` x TOKENS tokens (logits of the last position only, as the
    scorer projects only the positions it needs: the output projection then cancels between base and method).
    A warm-up forward first, so that work a module caches after its first call is not counted. oneDNN off: an
    LSTM runs as per-step ``addmm`` the counter sees (module docstring)."""
    ids = torch.randint(1, 256, (rows, TOKENS), generator=torch.Generator().manual_seed(rows))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")  # torch, on setting flags
        with torch.no_grad(), peft_legacy_calls(is_prompt_learning(model)), torch.backends.mkldnn.flags(enabled=False):
            model(input_ids=ids[:1], logits_to_keep=1, use_cache=False)  # legacy calls: as the scorer (prefix)
            with FlopCounterMode(display=False) as counter:
                model(input_ids=ids, logits_to_keep=1, use_cache=False)
    return counter.get_total_flops()


def measure(model, base) -> tuple[int, int]:
    """(counted extra FLOPs per row, counted extra FLOPs per forward call) of ``model`` over ``base``."""
    few, many = (counted(model, r) - counted(base, r) for r in ROWS)
    per_row, rest = divmod(many - few, ROWS[1] - ROWS[0])
    assert rest == 0
    return per_row, few - ROWS[0] * per_row


def masked(n: int) -> int:
    """Score-matrix entries above the diagonal of an ``n``-token causal sequence (computed by eager attention)."""
    return n * (n - 1) // 2


def matmul_params(model) -> int:
    """Weights of the body's Linear layers (N_body less norms and biases)."""
    return sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))


def expected_per_row(model, base, method: str, settings: dict) -> tuple[int, int]:
    """(the formula's FLOPs for one example of TOKENS tokens, the same made comparable with FlopCounterMode)."""
    dims = costs.ModelDims.from_model(base)
    assert not any(dims.windows)  # the attention correction below is for full attention
    ov = method_overhead(model, method, settings)
    work = costs.Work()
    work.add_tokens(TOKENS, 0, dims.windows)
    formula = eval_overhead_flops(dims, ov, work, 1)
    comparable = formula
    elementwise = ELEMENTWISE.get(method)
    if elementwise is not None:
        comparable -= elementwise(model, method, settings) * TOKENS
    if ov.virtual_tokens:
        comparable -= 2 * (dims.body_params - matmul_params(base)) * ov.virtual_tokens  # norms and biases
        comparable += (4 * dims.n_heads * dims.head_dim * dims.n_layers
                       * (masked(TOKENS + ov.virtual_tokens) - masked(TOKENS)))
    if method == "prefix_tuning":
        comparable += ov.train_per_row  # peft recomputes the prefix MLP for every row, in eval mode too
    return formula, comparable


def test_every_builtin_method_is_checked():
    assert set(METHODS) >= {"lora", "dora", "adalora", "vera", "lokr", "oft", "ia3", "tfew", "adapter",
                            "adapter_pfeiffer", "compacter", "mam", "unipelt", "prefix_tuning", "prompt_tuning",
                            "ptuning", "bitfit", "ln_tuning", "fishmask", "full", "intrinsic_said", "qlora"}
    assert set(ELEMENTWISE) <= set(METHODS) and set(PER_FORWARD) <= set(METHODS)
    assert set(PER_FORWARD_ELEMENTWISE) <= set(PER_FORWARD)


def prepared(tiny, method: str, settings: dict):
    """A copy of ``tiny`` with ``method`` applied as it is scored (eval mode), every trainable tensor nudged."""
    model = copy.deepcopy(tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = apply_method(model, method, settings)
    if method == "fishmask":  # the mask comes from the Fisher of training data; restore() attaches a given one
        from harness.methods.fishmask import restore

        restore(model, {"model.layers.0.mlp.down_proj.parametrizations.weight.0.saved_index": torch.tensor([0, 5, 77]),
                        "model.layers.1.self_attn.q_proj.parametrizations.weight.0.saved_index": torch.tensor([3, 9])})
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable, method
        for p in trainable:
            p.add_(0.01 * torch.randn_like(p))
    if method == "intrinsic_said":  # inference is the merged model (the formula's per_token is 0)
        from harness.methods.intrinsic_said import merge

        merge(model)
    return model.eval()


# Settings other than the paper preset's that change a method's per-forward-call work, checked as the presets are.
VARIANTS = {"oft-coft": ("oft", {"coft": True}), "ptuning-lstm": ("ptuning", {"encoder": "lstm"})}


@pytest.mark.parametrize("method", METHODS)
def test_inference_flops_formula_matches_flop_counter(tiny, method):
    if method == "qlora":
        pytest.skip("qlora: its 4-bit base is loaded from weights (quantize='nf4'), not built from this random model; its "
                    "overhead is LoRA's formula, checked for lora")
    settings = training_settings(method, "paper", {"steps": 10})  # steps: AdaLoRA's schedule
    try:
        model = prepared(tiny, method, settings)
    except HarnessError as exc:
        pytest.skip(f"{method} refuses the test model: {exc}")
    check_against_counter(model, tiny, method, settings)


@pytest.mark.parametrize("method, method_args", VARIANTS.values(), ids=VARIANTS.keys())
def test_variant_flops_formula_matches_flop_counter(tiny, method, method_args):
    settings = training_settings(method, "paper", {"steps": 10, "method_args": method_args})
    assert all(settings[key] == value for key, value in method_args.items())
    model = prepared(tiny, method, settings)
    check_against_counter(model, tiny, method, settings)
    plain = method_overhead(model, method, training_settings(method, "paper", {"steps": 10})).per_forward
    assert method_overhead(model, method, settings).per_forward > plain  # the variant's extra work is in the formula


def check_against_counter(model, tiny, method: str, settings: dict) -> None:
    """The formula's FLOPs per row and per forward call (made comparable) equal FlopCounterMode's exactly."""
    per_row, per_forward = measure(model, tiny)
    formula, comparable = expected_per_row(model, tiny, method, settings)
    assert abs(per_row - comparable) <= TOLERANCE * comparable, (method, per_row, comparable, formula)
    per_call = method_overhead(model, method, settings).per_forward
    elementwise = PER_FORWARD_ELEMENTWISE.get(method)
    per_call_comparable = per_call - (elementwise(model, method, settings) if elementwise else 0)
    assert per_forward == per_call_comparable, (method, per_forward, per_call_comparable, per_call)
    assert (per_forward > 0) == (method in PER_FORWARD), (method, per_forward)
    if method == "dora":  # the documented matmul part, from the test's own layer list
        r = settings["r"]
        layers = _adapted(model, method, settings, ("q", "v"))
        assert per_forward == sum(2 * r * d_in * (d_in + d_out) for _, d_in, d_out in layers)


def test_per_forward_flops_reach_evaluation_and_training():
    """Evaluation charges ``per_forward`` once per call of ``batch_size`` examples; training once per forward call,
    with its backward; methods without per-call work are unchanged."""
    from harness.methods.base import Overhead, train_overhead_flops

    dims = costs.ModelDims.from_model(tiny_llama())
    work = costs.Work()
    work.add_tokens(TOKENS, 0, dims.windows)
    ov = Overhead(per_token=5, per_forward=1000, per_forward_backward=2000)
    base = eval_overhead_flops(dims, ov, work, 10)
    assert base == 5 * TOKENS
    assert eval_overhead_flops(dims, ov, work, 10, 8) == base + 2 * 1000  # ceil(10 / 8) calls
    assert eval_overhead_flops(dims, ov, work, 10, 1) == base + 10 * 1000
    assert train_overhead_flops(ov, tokens=100, rows=7, forwards=4) == 3 * 5 * 100 + 4 * 3000
    plain = Overhead(per_token=5, train_per_row=11, train_per_forward=13)
    assert train_overhead_flops(plain, 100, 7, 4) == 3 * (5 * 100 + 11 * 7 + 13 * 4)
    assert eval_overhead_flops(dims, plain, work, 10, 8) == eval_overhead_flops(dims, plain, work, 10)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_ptuning_encoder_formula_counts_peft_encoder_weights(tiny, encoder):
    """p-tuning's per-call formula (from the config, so ``harness methods`` shows it on an unwrapped model) equals
    2 x the applied encoder's weight matrices x virtual tokens; a model in peft's inference mode has no per-call
    work."""
    from harness.methods.base import prompt_encoder_flops

    settings = training_settings("ptuning", "paper", {"method_args": {"encoder": encoder}})
    model = prepared(tiny, "ptuning", settings)
    ov = method_overhead(model, "ptuning", settings)
    assert ov.per_forward == prompt_encoder_flops(model, settings["n_virtual_tokens"]) > 0
    assert method_overhead(tiny, "ptuning", settings).per_forward == ov.per_forward
    model.peft_config["default"].inference_mode = True
    assert method_overhead(model, "ptuning", settings).per_forward == 0
