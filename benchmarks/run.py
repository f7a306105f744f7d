"""rlhfkit benchmarks, as ../shared/docs/BENCHMARK.md fixes them. Prints one JSON line on stdout.

    python benchmarks/run.py METHOD [--model DIR] [--tokenizer DIR] [--rm DIR] [--data DIR] [--steps N] [--warmup N]
                                   [--lora R] [--activation-checkpointing] [--reference-copy]

METHOD: ceiling, sft, rm, dpo, grpo, ppo, generate; and kto, orpo, cpo, rloo, distill, online_dpo
(outside BENCHMARK.md's table: on DPO's and GRPO's work, 32 prompts of one answer each to a teacher,
and 16 prompts of two answers each judged by a reward, with TRL's defaults for the method). Without --model/--data the benchmark builds
assets like the reference ones of BENCHMARK.md: the tiny default's arithmetic data, a byte-level
BPE tokenizer of vocab 1024 trained on it, and a Qwen2 model of hidden 256, 4 layers, 4 heads,
intermediate 1024, untied embeddings (a model folder without a tokenizer, as the contract allows).

``--lora R`` trains LoRA adapters of rank R (alpha 2R, every linear layer) instead of every
weight, ``--activation-checkpointing`` recomputes layer activations in the backward; every line
reports the trainable parameters and the peak RSS beside s/step. With ``--lora`` PPO's reference
is the actor with its adapters off; ``--reference-copy`` loads a frozen copy instead, to measure
what that saves.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

THREADS = int(os.environ["OMP_NUM_THREADS"])  # 2, as BENCHMARK.md fixes; OMP_NUM_THREADS=1 for a quick check
torch.set_num_threads(THREADS)

from rlhfkit.data.encode import collate_sft, encode_sft  # noqa: E402
from rlhfkit.data.rows import read_rows  # noqa: E402
from rlhfkit.methods.common import load_policy  # noqa: E402
from rlhfkit.methods.sft import sft_objective  # noqa: E402
from rlhfkit.models.tiny import TinySpec  # noqa: E402
from rlhfkit.train.config import LoraConfig, TrainConfig  # noqa: E402
from rlhfkit.train.dist import DistInfo  # noqa: E402
from rlhfkit.train.optim import build_optimizer, build_scheduler, optimizer_step  # noqa: E402
from rlhfkit.train.run import Run  # noqa: E402

REFERENCE = TinySpec(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024, tie_embeddings=False)
SETTINGS = {"dtype": "fp32", "threads": THREADS, "lr": 1e-5, "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 0}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bpe_tokenizer(texts: list[str], vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


# The scaling shapes of BENCHMARK.md: the same family (Qwen2, untied, vocab 1024) at three sizes
SHAPES = {"reference": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
          "30m": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8),
          "120m": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16)}
LONG_PROMPT_TOKENS = 240  # --seq long: a few-shot prompt of about this many tokens before the question


def few_shot(rows: list[dict], tokenizer, target: int, mixed: bool = False) -> list[dict]:
    """The rows with a few-shot prefix of other rows' solved problems ("What is 12+34? 46.") before
    each prompt, grown until the prompt has about ``target`` tokens: the same task at ~256 tokens
    per sequence, for the long-sequence shapes. ``mixed``: each row's target drawn from 0..target
    (lengths that vary as real data's do, for padding-free batches). Deterministic: row i takes its
    shots from rows i+1...
    """
    import random

    rng = random.Random(0)
    shots = [f"{r['prompt']}{r.get('completion', ' ' + str(r.get('answer', '')))}." for r in rows]
    lengths = [len(tokenizer(s + " ")["input_ids"]) for s in shots]
    out = []
    for i, row in enumerate(rows):
        prefix, n, j = [], len(tokenizer(row["prompt"])["input_ids"]), i + 1
        goal = rng.randint(0, target) if mixed else target
        while n < goal:
            prefix.append(shots[j % len(rows)])
            n += lengths[j % len(rows)]
            j += 1
        out.append({**row, "prompt": " ".join(prefix) + " " + row["prompt"]})
    return out


def assets(args) -> dict:
    """Paths of model, tokenizer and data: the flags, or reference-like assets built in a folder
    (``--assets DIR``: built there once and reused; else a fresh temp folder) at ``--shape`` and ``--seq``."""
    if args.model and args.data:
        return {"model": args.model, "tokenizer": args.tokenizer, "data": Path(args.data), "rm": args.rm}
    shape, seq = getattr(args, "shape", "reference"), getattr(args, "seq", "short")
    root = Path(args.assets) if getattr(args, "assets", None) else Path(tempfile.mkdtemp(prefix="rlhfkit-bench-"))
    paths = {"model": str(root / "base"), "tokenizer": args.tokenizer or str(root / "tokenizer"), "data": root / "data",
             "rm": args.rm}
    if (root / "done").exists():
        return paths
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlhfkit.tasks.arithmetic_files import write_task_files

    files = write_task_files(root / "data", seed=0)
    rows = [r.data for r in read_rows(files["sft_train"])]
    tokenizer = bpe_tokenizer([r["prompt"] + r["completion"] for r in rows])
    tokenizer.save_pretrained(str(root / "tokenizer"))
    for src, dst in (("sft_train", "sft"), ("prefs_train", "prefs"), ("prompts_train", "prompts")):
        data = [r.data for r in read_rows(files[src])]
        if seq in ("long", "mixed"):
            data = few_shot(data, tokenizer, LONG_PROMPT_TOKENS, mixed=seq == "mixed")
        (root / "data" / f"{dst}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    config = Qwen2Config(vocab_size=len(tokenizer), num_key_value_heads=SHAPES[shape]["num_attention_heads"],
                         tie_word_embeddings=False, max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(str(root / "base"))
    (root / "done").write_text(json.dumps({"shape": shape, "seq": seq}))
    return paths


def non_embedding_params(model) -> int:
    emb = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
           for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


PROFILE = {"steps": 0, "result": None}  # --profile N: N more steps under torch.profiler
SPLIT = {"steps": 0, "result": None}  # --split N: N more steps, products and optimizer steps timed directly


def timed_steps(step_fn, warmup: int, steps: int) -> tuple[list[float], list]:
    times, outputs = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        out = step_fn(i)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
            outputs.append(out)
    if PROFILE["steps"]:
        PROFILE["result"] = profile_steps(step_fn, warmup + steps, PROFILE["steps"])
    if SPLIT["steps"]:
        SPLIT["result"] = split_steps(step_fn, warmup + steps + PROFILE["steps"], SPLIT["steps"])
    return times, outputs


# Where a step's time goes: each profiled op's own (self) CPU time, by kind
OP_KINDS = (("matmul", ("linear_pointwise", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
            ("attention", ("scaled_dot_product",)),
            ("optimizer", ("_fused_adam", "_foreach_", "linalg_vector_norm")),
            ("elementwise_and_other_ops", ("aten::",)))


def profile_steps(step_fn, first: int, n: int) -> dict:
    """Milliseconds per step by kind of work, over ``n`` steps under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for i in range(first, first + n):
            step_fn(i)
        wall = time.perf_counter() - start
    if os.environ.get("RLHFKIT_PROFILE_TABLE"):
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40), file=sys.stderr)
    return by_kind(prof, n, wall)


def split_steps(step_fn, first: int, n: int) -> dict:
    """Milliseconds per step in the products (the training node's, whichever kernel this host chose,
    and every other oneDNN product: ``FastLinear``'s and the sampler's) and in the optimizer step
    (all-reduce, clip, AdamW, zero), each call timed with ``perf_counter``, and the rest of the wall
    time. No profiler: under torch.profiler with shapes recorded, a weight-gradient product of the
    SFT step took 2.06 ms against 0.28 ms timed this way, so the profile's split overstates the
    products. The training node's forward runs in Python for these steps
    (``RLHFKIT_SCRIPTED_LAYERS=0``): inside TorchScript its products would not be timed. The
    sampler's are not (its products count as the rest), nor the output heads' where they are plain
    ``nn.Linear`` layers (BLAS chosen)."""
    import rlhfkit.train.run as train_run
    from rlhfkit.models import fused, kernels

    spent = {"matmul": 0.0, "optimizer": 0.0}
    depth = [0]  # a product inside a timed product (the node's call of oneDNN) counts once

    def timing(kind: str, fn):
        def timed(*a, **kw):
            depth[0] += 1
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent[kind] += time.perf_counter() - start
        return timed

    here = sys.modules[__name__]
    products = [(kernels, "_onednn"), (fused, "_linear"), (fused, "_input_grad"), (fused, "_weight_grad")]
    saved = [getattr(m, name) for m, name in products], train_run.optimizer_step, here.optimizer_step
    for m, name in products:
        setattr(m, name, timing("matmul", getattr(m, name)))
    train_run.optimizer_step = here.optimizer_step = timing("optimizer", saved[1])
    scripted_layers = os.environ.get("RLHFKIT_SCRIPTED_LAYERS")
    os.environ["RLHFKIT_SCRIPTED_LAYERS"] = "0"
    try:
        start = time.perf_counter()
        for i in range(first, first + n):
            step_fn(i)
        wall = time.perf_counter() - start
    finally:
        for (m, name), fn in zip(products, saved[0]):
            setattr(m, name, fn)
        train_run.optimizer_step, here.optimizer_step = saved[1], saved[2]
        if scripted_layers is None:
            del os.environ["RLHFKIT_SCRIPTED_LAYERS"]
        else:
            os.environ["RLHFKIT_SCRIPTED_LAYERS"] = scripted_layers
    out = {k: round(v * 1e3 / n, 2) for k, v in spent.items()}
    out["rest"] = round((wall - sum(spent.values())) * 1e3 / n, 2)
    out["wall"] = round(wall * 1e3 / n, 2)
    return out


def by_kind(prof, n: int, wall: float) -> dict:
    """A profile's self CPU time per step by kind: matmul, attention, the optimizer and clipping
    kernels, every other tensor op (elementwise, reductions, copies, indexing), and what is left of
    the wall time (Python, autograd bookkeeping, dispatch: ``overhead``)."""
    out = {kind: 0.0 for kind, _ in OP_KINDS}
    for event in prof.key_averages():
        for kind, keys in OP_KINDS:
            if any(k in event.key for k in keys):
                out[kind] += event.self_cpu_time_total / 1e3 / n
                break
    out = {k: round(v, 2) for k, v in out.items()}
    out["overhead"] = round(wall * 1e3 / n - sum(out.values()), 2)
    out["wall"] = round(wall * 1e3 / n, 2)
    return out


def bench_run(args) -> Run:
    """A run skeleton outside a real run: it prepares trained models as ``--lora`` and
    ``--activation-checkpointing`` say, and does the optimizer step for GRPO."""
    cfg = TrainConfig(max_grad_norm=SETTINGS["max_grad_norm"], activation_checkpointing=args.activation_checkpointing)
    return Run(cfg, {}, DistInfo(), "bench", "step")


def lora_config(args) -> LoraConfig:
    return LoraConfig(r=args.lora, alpha=2.0 * args.lora) if args.lora else LoraConfig()


def prepared(model, args, head: str | None = None, base=None):
    return bench_run(args).prepare(model, lora_config(args), head=head, base=base)


def memory_extra(args, *trained) -> dict:
    return {"trainable_params": sum(p.numel() for m in trained for p in m.parameters() if p.requires_grad),
            "params": sum(p.numel() for m in trained for p in m.parameters()), "lora_r": args.lora,
            "activation_checkpointing": args.activation_checkpointing}


def report(method: str, times: list[float], losses: list[float], train_tokens: float, nograd_tokens: float,
           model, extra: dict) -> dict:
    sec = statistics.median(times)
    flops = 6 * non_embedding_params(model) * train_tokens + 2 * sum(p.numel() for p in model.parameters()) * nograd_tokens
    return {"method": method, "library": "rlhfkit", "sec_per_step": round(sec, 5),
            "sec_per_step_min": round(min(times), 5), "sec_per_step_max": round(max(times), 5),
            "tokens_per_s": round(train_tokens / sec, 1), "model_gflops_per_s": round(flops / sec / 1e9, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "first_loss": losses[0], "last_loss": losses[-1], "steps": len(times), **extra,
            "settings": SETTINGS, **kernel_choice(), **measured_split()}


def kernel_choice() -> dict:
    """The kernels this process chose (models/kernels.py), for the linear layers (``linear_kernel``,
    ``kernel_ms``) and the sampler's decoder (``decode_kernel``, ``decode_ms``), and the timings;
    on oneDNN, the fewest new tokens for which a sampling call lays its weights out
    (``layout_min_new_tokens``, timed; null: never)."""
    from rlhfkit.models.kernels import NEVER, decode_kernel, layout_min_new_tokens, linear_kernel

    out = {}
    for name, timings, (kernel, onednn_s, blas_s) in (("linear_kernel", "kernel_ms", linear_kernel()),
                                                      ("decode_kernel", "decode_ms", decode_kernel())):
        out[name] = kernel
        if onednn_s == onednn_s:  # timed (auto), not forced
            out[timings] = {"onednn": round(onednn_s * 1e3, 3), "blas": round(blas_s * 1e3, 3)}
    if out["decode_kernel"] == "onednn":
        tokens = layout_min_new_tokens()
        out["layout_min_new_tokens"] = tokens if tokens < NEVER else None
    return out


def measured_split() -> dict:
    """--profile's and --split's results, where asked for."""
    return {**({"profile_ms_per_step": PROFILE["result"]} if PROFILE["result"] else {}),
            **({"split_ms_per_step": SPLIT["result"]} if SPLIT["result"] else {})}


def example_tokens(example, shared: bool = False) -> tuple[int, int]:
    """(tokens through the forward, tokens of the plain one-row-per-sequence layout) of one example:
    an SFT sequence, an unpaired answer (KTO's), or a ranking whose prompt a shared-prompt batch
    forwards once."""
    if hasattr(example, "input_ids"):
        return len(example.input_ids), len(example.input_ids)
    if hasattr(example, "desirable"):
        n = len(example.prompt_ids) + len(example.completion_ids)
        return n, n
    plain = sum(len(example.prompt_ids) + len(c) for c in example.completion_ids)
    return (len(example.prompt_ids) + sum(map(len, example.completion_ids)) if shared else plain), plain


def offline_bench(method: str, args, model, examples, collate, objective, rows_per_step: int, extra: dict,
                  nograd_passes: int = 0) -> dict:
    """The offline methods' step as the shared loop runs it: loss, backward, clip, AdamW step
    (``nograd_passes``: no-grad forwards of the same tokens per step, e.g. DPO's reference).

    ``tokens_per_s`` counts the non-pad tokens through the forward (a shared prompt once);
    ``sequence_tokens_per_s`` every sequence's tokens as the plain layout holds them (the same
    work, counted as TRL's forward sees it)."""
    from rlhfkit.data.prefs import SharedPromptBatch

    optimizer = build_optimizer(model, SETTINGS["lr"])
    scheduler = build_scheduler(optimizer, 10**9, 0, "constant")
    tokens, plain = [], []

    def step(i: int) -> float:
        rows = examples[(i * rows_per_step) % len(examples):][:rows_per_step]
        batch = collate(rows)
        loss, _ = objective.loss(model, batch, objective.counts(batch))
        loss.backward()
        optimizer_step(model, optimizer, scheduler, SETTINGS["max_grad_norm"], DistInfo(), i)
        counts = [example_tokens(r, isinstance(batch, SharedPromptBatch)) for r in rows]
        tokens.append(sum(c[0] for c in counts))
        plain.append(sum(c[1] for c in counts))
        return loss.item()

    times, losses = timed_steps(step, args.warmup, args.steps)
    n = statistics.mean(tokens[args.warmup:])
    result = report(method, times, losses, n, nograd_passes * n, model, extra)
    result["sequence_tokens_per_s"] = round(statistics.mean(plain[args.warmup:]) / result["sec_per_step"], 1)
    return result


def bench_sft(args) -> dict:
    from rlhfkit.data.encode import collate_sft_packed

    paths = assets(args)
    model, tokenizer = load_policy(paths["model"], paths["tokenizer"])
    model = prepared(model, args, base=paths["model"])
    examples, _ = encode_sft(read_rows(paths["data"] / "sft.jsonl"), tokenizer, args.max_length, overlong="truncate")
    pad = tokenizer.pad_token_id
    collate = ((lambda rows: collate_sft_packed(rows, pad, args.max_length)) if args.packing else
               (lambda rows: collate_sft(rows, pad)))
    return offline_bench("sft", args, model, examples, collate, sft_objective(), 16,
                         {"batch_sequences": 16, "max_length": args.max_length, "packing": args.packing,
                          **memory_extra(args, model)})


def _pairs(paths, tokenizer, max_length: int):
    from rlhfkit.data.prefs import encode_rankings

    examples, _ = encode_rankings(read_rows(paths["data"] / "prefs.jsonl"), tokenizer, max_length, overlong="skip")
    return examples


def bench_rm(args) -> dict:
    from rlhfkit.methods.common import ranking_collate
    from rlhfkit.methods.rm import rm_objective
    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.models.reward import load_reward_model

    paths = assets(args)
    tokenizer = load_tokenizer(paths["model"], paths["tokenizer"])
    model = prepared(load_reward_model(args.rm or paths["model"], tokenizer), args, head="score")
    share = not args.no_share_prompt
    return offline_bench("rm", args, model, _pairs(paths, tokenizer, args.max_length),
                         ranking_collate(model, tokenizer.pad_token_id, share), rm_objective(), 16,
                         {"pairs_per_step": 16, "share_prompt": share, **memory_extra(args, model)})


def bench_dpo(args) -> dict:
    from rlhfkit.methods.common import ranking_collate
    from rlhfkit.methods.dpo import DPOLoss, dpo_objective
    from rlhfkit.models.rankings import precompute_reference

    paths = assets(args)
    model, tokenizer = load_policy(paths["model"], paths["tokenizer"])
    model = prepared(model, args, base=paths["model"])  # adapters start at B = 0: the policy is its reference
    examples = _pairs(paths, tokenizer, args.max_length)[: 16 * (args.steps + args.warmup)]
    collate = ranking_collate(model, tokenizer.pad_token_id, share_prompt=not args.no_share_prompt)
    extra = {"pairs_per_step": 16, "beta": 0.1, "share_prompt": not args.no_share_prompt, **memory_extra(args, model)}
    if args.dpo_reference == "forward":  # like for like with TRL: a frozen copy forwarded on every batch
        from rlhfkit.methods.common import frozen_reference

        reference = frozen_reference(bench_run(args), model, paths["model"], tokenizer, bool(args.lora))
        return offline_bench("dpo", args, model, examples, collate, dpo_objective(DPOLoss(beta=0.1), reference), 16,
                             {**extra, "reference": "forwarded every step"}, nograd_passes=1)
    start = time.perf_counter()
    examples = precompute_reference(model, examples, tokenizer.pad_token_id)  # the policy at step 0 = the reference
    precompute_s = time.perf_counter() - start
    result = offline_bench("dpo", args, model, examples, collate, dpo_objective(DPOLoss(beta=0.1)), 16,
                           {**extra, "reference": "precomputed once before training",
                            "reference_precompute_s": round(precompute_s, 3)})
    per_step_ref = precompute_s / (args.steps + args.warmup)
    result["sec_per_step_including_reference"] = round(result["sec_per_step"] + per_step_ref, 5)
    return result


def reference_free_bench(method: str, loss_type: str, args) -> dict:
    """DPO's work with no reference model: 16 pairs a step, a form on log pi (TRL's beta 0.1) plus
    the chosen answers' NLL (weight 1), as TRL's ORPOTrainer and CPOTrainer (ORPO's NLL there also
    reads the prompts' tokens: the same forwards)."""
    from rlhfkit.methods.common import ranking_collate
    from rlhfkit.methods.dpo import DPOLoss, dpo_objective
    from rlhfkit.models.rankings import no_reference

    paths = assets(args)
    model, tokenizer = load_policy(paths["model"], paths["tokenizer"])
    model = prepared(model, args, base=paths["model"])
    examples = no_reference(_pairs(paths, tokenizer, args.max_length)[: 16 * (args.steps + args.warmup)])
    collate = ranking_collate(model, tokenizer.pad_token_id, share_prompt=not args.no_share_prompt)
    objective = dpo_objective(DPOLoss(beta=0.1, loss_type=loss_type, rpo_alpha=1.0, reference="none"))
    return offline_bench(method, args, model, examples, collate, objective, 16,
                         {"pairs_per_step": 16, "beta": 0.1, "reference": "none", **memory_extra(args, model)})


def bench_orpo(args) -> dict:
    """Outside BENCHMARK.md's table (ORPO is not in it): ORPO's odds-ratio term plus the NLL."""
    return reference_free_bench("orpo", "orpo", args)


def bench_cpo(args) -> dict:
    """Outside BENCHMARK.md's table (CPO is not in it): TRL's CPOTrainer defaults, the sigmoid form
    on log pi plus the NLL (cpo_alpha 1)."""
    return reference_free_bench("cpo", "sigmoid", args)


def bench_kto(args) -> dict:
    """Outside BENCHMARK.md's table (KTO is not in it), on DPO's data: its first 16 pairs a step read as
    32 unpaired answers (chosen desirable, rejected not), beta 0.1, the reference a frozen copy forwarded
    every step; z_0 from one mismatched pair per answer (policy and reference, no gradient), as TRL's."""
    from rlhfkit.data.unpaired import collate_unpaired, encode_unpaired, with_mismatched
    from rlhfkit.methods.common import frozen_reference
    from rlhfkit.methods.kto import KTOConfig, kto_objective

    paths = assets(args)
    model, tokenizer = load_policy(paths["model"], paths["tokenizer"])
    model = prepared(model, args, base=paths["model"])
    rows = read_rows(paths["data"] / "prefs.jsonl")[: 16 * (args.steps + args.warmup)]
    examples, _ = encode_unpaired(rows, tokenizer, args.max_length, overlong="skip")
    examples = with_mismatched(examples, args.max_length, seed=0)
    reference = frozen_reference(bench_run(args), model, paths["model"], tokenizer, bool(args.lora))
    cfg = KTOConfig(beta=0.1, max_length=args.max_length)
    return offline_bench("kto", args, model, examples, lambda rows: collate_unpaired(rows, tokenizer.pad_token_id),
                         kto_objective(cfg, model, reference, "cpu"), 32,
                         {"answers_per_step": 32, "beta": 0.1, "reference": "forwarded every step",
                          **memory_extra(args, model)}, nograd_passes=3)


def _prompts(paths, tokenizer) -> tuple[list, list]:
    from rlhfkit.data.encode import encode_prompt

    rows = read_rows(paths["data"] / "prompts.jsonl")
    return rows, [encode_prompt(tokenizer, r.data["prompt"]) for r in rows]


def bench_generate(args) -> dict:
    from rlhfkit.models.memory import keep_freed_memory
    from rlhfkit.rollout.sampler import left_pad, sample

    paths = assets(args)
    model, tokenizer = load_policy(paths["model"], paths["tokenizer"])
    model.eval()
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(paths["model"]).eval()  # as TRL would have it: no rlhfkit kernels
    _, prompts = _prompts(paths, tokenizer)
    kw = dict(eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, max_new_tokens=16, temperature=1.0,
              num_samples=4, stop_at_eos=False)

    def ours(i: int) -> int:
        s = sample(model, prompts[i * 8:][:8], **kw)
        return int(s.completion_mask.sum())

    def theirs(i: int) -> int:
        ids, mask = left_pad(prompts[i * 8:][:8], tokenizer.pad_token_id)
        with torch.no_grad():
            out = plain.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=16, min_new_tokens=16, num_return_sequences=4,
                                 pad_token_id=tokenizer.pad_token_id)
        return int((out.shape[1] - ids.shape[1]) * out.shape[0])

    extra = PROFILE["steps"], SPLIT["steps"]
    PROFILE["steps"] = SPLIT["steps"] = 0  # --profile and --split are about rlhfkit's sampler: not run for theirs
    t_theirs, n_theirs = timed_steps(theirs, args.warmup, args.steps)
    PROFILE["steps"], SPLIT["steps"] = extra
    # each under its library's own malloc settings: transformers' generate under glibc's defaults,
    # then rlhfkit's sampler as it runs inside an rlhfkit run, which keeps freed memory (models/memory.py)
    keep_freed_memory()
    t_ours, n_ours = timed_steps(ours, args.warmup, args.steps)
    ours_s, theirs_s = statistics.median(t_ours), statistics.median(t_theirs)
    params = sum(p.numel() for p in model.parameters())
    return {"method": "generate", "library": "rlhfkit", "sec_per_step": round(ours_s, 5),
            "sec_per_step_min": round(min(t_ours), 5), "sec_per_step_max": round(max(t_ours), 5),
            "hf_generate_sec_per_step": round(theirs_s, 5), "speedup_vs_hf_generate": round(theirs_s / ours_s, 2),
            "gen_tokens_per_s": round(n_ours[0] / ours_s, 1), "hf_gen_tokens_per_s": round(n_theirs[0] / theirs_s, 1),
            "model_gflops_per_s": round(2 * params * n_ours[0] / ours_s / 1e9, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "sequences": 32, "new_tokens": 16, "settings": SETTINGS, **kernel_choice(), **measured_split()}


def rollout_bench(method: str, args, run, model, tokenizer, paths, update_fn, extra: dict,
                  nograd_passes: int = 0) -> dict:
    """GRPO's and RLOO's step: 8 prompts x 4 samples of at most 16 new tokens, temperature 1,
    scored by the contains-answer reward, then ``update_fn(samples, scores) -> loss`` (advantages
    and the optimizer step). ``nograd_passes``: forwards without gradient of the sampled sequences
    besides sampling (RLOO's pi_old and pi_ref)."""
    from rlhfkit.rollout.rewards import score_outcomes
    from rlhfkit.rollout.sampler import decode, sample
    from rlhfkit.tasks.arithmetic import contains_answer

    rows, prompts = _prompts(paths, tokenizer)
    optimizer = build_optimizer(model, SETTINGS["lr"])
    scheduler = build_scheduler(optimizer, 10**9, 0, "constant")
    run.modules = (model, optimizer, scheduler)
    sampled, trained = [], []

    def step(i: int) -> float:
        chunk = list(range(i * 8, i * 8 + 8))
        samples = sample(model, [prompts[j % len(prompts)] for j in chunk], eos_id=tokenizer.eos_token_id,
                         pad_id=tokenizer.pad_token_id, max_new_tokens=16, temperature=1.0, num_samples=4)
        texts = decode(tokenizer, samples)
        answers = [rows[j % len(rows)].data["answer"] for j in chunk for _ in range(4)]
        scores = score_outcomes([contains_answer], [1.0], [""] * len(texts), texts, {"answer": answers})
        loss = update_fn(samples, scores)
        sampled.append(int(samples.completion_mask.sum()))
        trained.append(int(samples.attention_mask.sum()))
        return loss

    times, losses = timed_steps(step, args.warmup, args.steps)
    gen, train = statistics.mean(sampled[args.warmup:]), statistics.mean(trained[args.warmup:])
    result = report(method, times, losses, train, gen + nograd_passes * train, model,
                    {"prompts": 8, "group_size": 4, "max_new_tokens": 16, **extra, **memory_extra(args, model)})
    result["gen_tokens_per_s"] = round(gen / result["sec_per_step"], 1)
    return result


def bench_grpo(args) -> dict:
    from rlhfkit.losses.grpo import group_advantages
    from rlhfkit.methods.grpo import EntropyBonus, GRPOConfig, Rollout, update
    paths = assets(args)
    model, tokenizer = load_policy(paths["model"], paths["tokenizer"])
    run = bench_run(args)
    model = run.prepare(model, lora_config(args), base=paths["model"])
    # BENCHMARK.md: groups whose advantages are all zero are forwarded like the rest (--skip-zero-advantage:
    # rlhfkit's default with beta 0, outside the contract)
    cfg = GRPOConfig(group_size=4, prompts_per_step=8, max_new_tokens=16, beta=0.0, mu=1,
                     skip_zero_advantage=args.skip_zero_advantage)

    def update_fn(samples, scores) -> float:
        adv = group_advantages(scores.rewards, 4)[:, None].expand(-1, samples.completion_ids.shape[1])
        return update(run, model, None, Rollout(samples, scores, adv, 0.0), cfg, exact=True,
                      pad_id=tokenizer.pad_token_id, bonus=EntropyBonus(run, cfg))["loss"]

    return rollout_bench("grpo", args, run, model, tokenizer, paths, update_fn,
                         {"beta": 0.0, "skip_zero_advantage": args.skip_zero_advantage})


def bench_rloo(args) -> dict:
    """Outside BENCHMARK.md's table (RLOO is not in it), on GRPO's work (8 prompts x 4 samples of at
    most 16 new tokens, temperature 1, the contains-answer reward, one update a batch) with TRL's RLOO
    defaults: beta 0.05, the KL in the reward (pi_old and the frozen reference forwarded, no gradient),
    the leave-one-out baseline, the loss on each answer's whole ratio."""
    from rlhfkit.losses.grpo import loo_advantages
    from rlhfkit.methods.common import frozen_reference
    from rlhfkit.methods.grpo import EntropyBonus, Rollout, rloo_advantages, update
    from rlhfkit.methods.rloo import RLOOConfig
    paths = assets(args)
    model, tokenizer = load_policy(paths["model"], paths["tokenizer"])
    run = bench_run(args)
    model = run.prepare(model, lora_config(args), base=paths["model"])
    reference = frozen_reference(run, model, paths["model"], tokenizer, bool(args.lora))
    cfg = RLOOConfig(group_size=4, prompts_per_step=8, max_new_tokens=16, mu=1)

    def update_fn(samples, scores) -> float:
        adv = loo_advantages(scores.rewards, 4)[:, None].expand(-1, samples.completion_ids.shape[1])
        batch, _ = rloo_advantages(run, model, reference, Rollout(samples, scores, adv, 0.0), cfg)
        return update(run, model, None, batch, cfg, exact=True, pad_id=tokenizer.pad_token_id,
                      bonus=EntropyBonus(run, cfg))["loss"]

    return rollout_bench("rloo", args, run, model, tokenizer, paths, update_fn, {"beta": 0.05}, nograd_passes=2)


def teacher_folder(paths) -> str:
    """Distillation's teacher: the model's architecture initialised from another seed (1), saved
    beside it once (run.py distill and trl_distill.py read the same folder)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(f"{paths['model']}-teacher")
    if not (folder / "config.json").is_file():
        torch.manual_seed(1)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(paths["model"])).save_pretrained(str(folder))
    return str(folder)


def bench_distill(args) -> dict:
    """Outside BENCHMARK.md's table (distillation is not in it): 32 prompts, one answer each of at
    most 16 new tokens (temperature 1, no top-k/top-p), then the step of TRL's DistillationTrainer
    defaults: the reverse KL (beta 1) to a frozen teacher of the same size over every answer token,
    the teacher forwarded without gradient."""
    from rlhfkit.methods.distill import DistillConfig, distill_step
    from rlhfkit.models.load import load_causal_lm
    from rlhfkit.models.lora import Reference
    from rlhfkit.rollout.sampler import sample

    paths = assets(args)
    model, tokenizer = load_policy(paths["model"], paths["tokenizer"])
    run = bench_run(args)
    model = run.prepare(model, lora_config(args), base=paths["model"])
    teacher = Reference(module=load_causal_lm(teacher_folder(paths), tokenizer, copy=True).eval().requires_grad_(False))
    cfg = DistillConfig(prompts_per_step=32, max_new_tokens=16, beta=1.0)
    _, prompts = _prompts(paths, tokenizer)
    optimizer = build_optimizer(model, SETTINGS["lr"])
    run.modules = (model, optimizer, build_scheduler(optimizer, 10**9, 0, "constant"))
    sampled, trained = [], []

    def step(i: int) -> float:
        samples = sample(model, [prompts[j % len(prompts)] for j in range(i * 32, i * 32 + 32)],
                         eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, max_new_tokens=16,
                         temperature=1.0)
        sampled.append(int(samples.completion_mask.sum()))
        trained.append(int(samples.attention_mask.sum()))
        return distill_step(run, model, teacher, samples, cfg)["loss"]

    times, losses = timed_steps(step, args.warmup, args.steps)
    gen, train = statistics.mean(sampled[args.warmup:]), statistics.mean(trained[args.warmup:])
    result = report("distill", times, losses, train, gen + train, model,
                    {"prompts": 32, "max_new_tokens": 16, "beta": 1.0, **memory_extra(args, model)})
    result["gen_tokens_per_s"] = round(gen / result["sec_per_step"], 1)
    return result


def bench_online_dpo(args) -> dict:
    """Outside BENCHMARK.md's table (online DPO is not in it): 16 prompts a step, two answers each of
    at most 16 new tokens (temperature 1, no top-k/top-p), judged by the contains-answer reward with
    TRL's rule on ties (``ties=first``: every pair trained, as TRL's), then one optimizer step of
    DPO's sigmoid loss (beta 0.1) against a frozen copy of the start model forwarded every step:
    the method's own ``judge`` and ``dpo_step``."""
    from types import SimpleNamespace

    from rlhfkit.methods.common import frozen_reference, ranking_collate
    from rlhfkit.methods.dpo import DPOLoss, dpo_objective
    from rlhfkit.methods.online_dpo import OnlineDPOConfig, dpo_step, judge
    from rlhfkit.methods.online_rewards import Rewards
    from rlhfkit.rollout.backend import SamplerBackend
    from rlhfkit.tasks.arithmetic import contains_answer

    paths = assets(args)
    model, tokenizer = load_policy(paths["model"], paths["tokenizer"])
    run = bench_run(args)
    model = run.prepare(model, lora_config(args), base=paths["model"])
    reference = frozen_reference(run, model, paths["model"], tokenizer, bool(args.lora))
    cfg = OnlineDPOConfig(rewards="contains_answer", ties="first", beta=0.1, prompts_per_step=16, max_new_tokens=16,
                          temperature=1.0)
    rewards = Rewards([contains_answer], [1.0], None)
    rows = read_rows(paths["data"] / "prompts.jsonl")
    backend = SamplerBackend(tokenizer, model)
    objective = dpo_objective(DPOLoss(beta=0.1, reference="forward"), reference)
    collate = ranking_collate(model, tokenizer.pad_token_id, share_prompt=not args.no_share_prompt)
    optimizer = build_optimizer(model, SETTINGS["lr"])
    run.modules = (model, optimizer, build_scheduler(optimizer, 10**9, 0, "constant"))
    sampled, trained, pairs, split = [], [], [], []

    def step(i: int) -> float:
        mine = [rows[j % len(rows)] for j in range(i * 16, i * 16 + 16)]
        start = time.perf_counter()
        judged = judge(backend, tokenizer, mine, cfg, rewards, SimpleNamespace(global_step=i, max_steps=10**9))
        judging = time.perf_counter() - start - judged["time_generation_s"]
        shares, _ = dpo_step(run, model, judged["pairs"], objective, collate)
        split.append({"time_generation_s": judged["time_generation_s"], "time_judging_s": judging,
                      "time_update_s": time.perf_counter() - start - judged["time_generation_s"] - judging})
        pairs.append(len(judged["pairs"]))
        sampled.append(judged["counts"]["tokens"])
        trained.append(sum(len(p.prompt_ids) + sum(map(len, p.completion_ids)) for p in judged["pairs"]))
        return float(shares["loss"])

    times, losses = timed_steps(step, args.warmup, args.steps)
    gen, train = statistics.mean(sampled[args.warmup:]), statistics.mean(trained[args.warmup:])
    result = report("online_dpo", times, losses, train, gen + train, model,
                    {"prompts": 16, "answers_per_prompt": 2, "max_new_tokens": 16, "beta": 0.1, "ties": "first",
                     "pairs_per_step": statistics.mean(pairs[args.warmup:]), "reference": "forwarded every step",
                     **memory_extra(args, model)})
    result["gen_tokens_per_s"] = round(gen / result["sec_per_step"], 1)
    result["time_split_s"] = {k: round(statistics.median(s[k] for s in split[args.warmup:]), 4) for k in split[0]}
    return result


def bench_ppo(args) -> dict:
    from rlhfkit.methods.ppo import PPOConfig, load_models, make_experience, minibatch_loss
    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.models.reward import load_reward_model
    from rlhfkit.rollout.backend import SamplerBackend

    paths = assets(args)
    rm = paths["rm"]
    if not rm:  # a sequence classifier made from the base model (random score head)
        rm = str(Path(tempfile.mkdtemp(prefix="rlhfkit-bench-rm-")))
        load_reward_model(paths["model"], load_tokenizer(paths["model"], paths["tokenizer"])).save_pretrained(rm)
    cfg = PPOConfig(model=paths["model"], tokenizer=paths["tokenizer"], reward_model=rm, critic=rm,
                    prompts_per_step=32, minibatch_size=32, ppo_epochs=1, max_new_tokens=16, kl_coef=0.05,
                    lora=lora_config(args))
    models, tokenizer = load_models(cfg, run=bench_run(args))
    if args.reference_copy and models["reference"].module is None:  # LoRA, but a frozen copy as the reference
        from rlhfkit.models.load import load_causal_lm
        from rlhfkit.models.lora import Reference

        models["reference"] = Reference(load_causal_lm(paths["model"], tokenizer).eval().requires_grad_(False))
    rows, prompts = _prompts(paths, tokenizer)
    trained = torch.nn.ModuleDict({"actor": models["actor"], "critic": models["critic"]})
    optimizer = build_optimizer(trained, SETTINGS["lr"], 0.0, {"actor": SETTINGS["lr"], "critic": SETTINGS["lr"]})
    scheduler = build_scheduler(optimizer, 10**9, 0, "constant")
    gen, trained_tokens, split = [], [], []

    def step(i: int) -> float:
        start = time.perf_counter()
        # one minibatch: the critic's values of the update's forward are V_old
        exp, times = make_experience(models, SamplerBackend(tokenizer, models["actor"]),
                                     [prompts[(i * 32 + j) % len(prompts)] for j in range(32)], cfg, cfg.kl_coef)
        trained.train()
        loss, _ = minibatch_loss(models["actor"], models["critic"], exp, exp.first_order, cfg,
                                 {"tokens": exp.mask.sum().item()}, values=exp.take_first_values())
        loss.backward()
        optimizer_step(trained, optimizer, scheduler, SETTINGS["max_grad_norm"], DistInfo(), i,
                       clip_apart=[models["actor"], models["critic"]])
        gen.append(int(exp.mask.sum()))
        trained_tokens.append(int(exp.samples.attention_mask.sum()))
        split.append({**times, "time_update_s": time.perf_counter() - start - sum(times.values())})
        return loss.item()

    times, losses = timed_steps(step, args.warmup, args.steps)
    g = statistics.mean(gen[args.warmup:])
    t = statistics.mean(trained_tokens[args.warmup:])
    # actor and critic train on every token (2 trained forwards; the critic's doubles as V_old);
    # sampling, the reward model and the reference are no-grad passes
    result = report("ppo", times, losses, 2 * t, g + 2 * t, models["actor"],
                    {"prompts": 32, "new_tokens": 16, "ppo_epochs": 1, "minibatches": 1, "kl_coef": 0.05,
                     "reference": "frozen copy" if models["reference"].module is not None else "actor, adapters off",
                     **memory_extra(args, models["actor"], models["critic"])})
    result["gen_tokens_per_s"] = round(g / result["sec_per_step"], 1)
    result["time_split_s"] = {k: round(statistics.median(s[k] for s in split[args.warmup:]), 4) for k in split[0]}
    return result


def bench_ceiling(args) -> dict:
    """fp32 matmul rate on the benchmark's threads for the reference model's shapes (2048 tokens of a
    step): plain ``torch.mm`` (``mm_gflops_per_s``, the best shape) and oneDNN's kernel
    (``onednn_gflops_per_s``), the ceilings the methods' model GFLOP/s compare with; and which of the
    two rlhfkit's linear layers chose on this host (``linear_kernel``, models/kernels.py)."""
    from rlhfkit.models.kernels import _onednn, onednn_linear_available

    h, inter, tokens = REFERENCE.hidden_size, REFERENCE.intermediate_size, 2048
    shapes = {"qkvo": (tokens, h, h), "mlp_up": (tokens, h, inter), "mlp_down": (tokens, inter, h)}
    result = {"method": "ceiling", "threads": torch.get_num_threads()}

    def rate(fn, m, k, n, reps=20) -> float:
        for _ in range(3):
            fn()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return round(2 * m * k * n * reps / (time.perf_counter() - start) / 1e9, 1)

    for name, (m, k, n) in shapes.items():
        a, b, w = torch.randn(m, k), torch.randn(k, n), torch.randn(n, k)
        result[f"{name}_gflops_per_s"] = rate(lambda: torch.mm(a, b), m, k, n)
        if onednn_linear_available():
            result[f"{name}_onednn_gflops_per_s"] = rate(lambda: _onednn(a, w, None), m, k, n)
    result["mm_gflops_per_s"] = max(v for k, v in result.items() if k.endswith("_gflops_per_s") and "onednn" not in k)
    onednn = [v for k, v in result.items() if k.endswith("_onednn_gflops_per_s")]
    result["onednn_gflops_per_s"] = max(onednn) if onednn else None
    result.update(kernel_choice())
    result["cpu_flags"] = sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if _has_cpu_flag(f))
    return result


def _has_cpu_flag(flag: str) -> bool:
    try:
        return f" {flag}" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


BENCHES = {"sft": bench_sft, "rm": bench_rm, "dpo": bench_dpo, "grpo": bench_grpo, "ppo": bench_ppo,
           "generate": bench_generate, "ceiling": bench_ceiling, "kto": bench_kto, "orpo": bench_orpo, "cpo": bench_cpo, "rloo": bench_rloo,
           "distill": bench_distill, "online_dpo": bench_online_dpo}


def parser() -> argparse.ArgumentParser:
    """The flags of run.py, which the TRL scripts take too (same assets, same work)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--tokenizer")
    p.add_argument("--rm")
    p.add_argument("--data")
    p.add_argument("--assets", help="build the reference-like assets in this folder once and reuse them")
    p.add_argument("--shape", choices=sorted(SHAPES), default="reference", help="model size of the built assets")
    p.add_argument("--seq", choices=("short", "long", "mixed"), default="short",
                   help="long: a few-shot prompt of ~240 tokens before each question (~256 per sequence); "
                        "mixed: 0-240 such tokens, drawn per row")
    p.add_argument("--max-length", type=int, default=128, help="sft/rm/dpo sequence length limit (320 for --seq long)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timed steps, profile N more: ms per step by matmul, attention, optimizer, "
                        "other ops and overhead")
    return p


def main() -> None:
    p = parser()
    p.add_argument("method", choices=sorted(BENCHES))
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (0: train every weight)")
    p.add_argument("--packing", action="store_true", help="sft: padding-free batches (SFTConfig.packing)")
    p.add_argument("--no-share-prompt", action="store_true",
                   help="rm/dpo: one row per answer instead of each prompt once for its answers")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--skip-zero-advantage", action="store_true",
                   help="grpo: rlhfkit's default with beta 0, not BENCHMARK.md's work: groups whose advantages are "
                        "all zero are not forwarded")
    p.add_argument("--reference-copy", action="store_true", help="ppo --lora: a frozen reference copy")
    p.add_argument("--dpo-reference", choices=("precompute", "forward"), default="precompute",
                   help="dpo: reference log-probs precomputed once (rlhfkit's default) or a frozen copy "
                        "forwarded every step (as TRL does)")
    p.add_argument("--split", type=int, default=0, metavar="N",
                   help="after the timed (and profiled) steps, N more with every oneDNN product and optimizer "
                        "step timed directly, no profiler: ms per step in matmul, optimizer and the rest")
    args = p.parse_args()
    PROFILE["steps"], SPLIT["steps"] = args.profile, args.split
    torch.manual_seed(0)
    print(json.dumps(BENCHES[args.method](args)), flush=True)


if __name__ == "__main__":
    main()
