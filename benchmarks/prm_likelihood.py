"""An experiment for issue #14, not a product path: a process reward read from the model's own
next-token likelihoods instead of a head at the separator.

    python benchmarks/prm_likelihood.py LM TRAIN_JSONL EVAL_JSONL [--steps 1000] [--extra-eval JSONL]
    python benchmarks/prm_likelihood.py LM --sample PROMPTS_JSONL OUT_JSONL [--per-prompt 4] [--limit 4000]

Step j's logit is ``min over the step's tokens t of log p(x_t | x_<t) - floor`` (floor = -3: a step
is judged wrong when the model gives one of its tokens less than e^-3 ~ 0.05), and the causal LM
is trained with the PRM's own per-step BCE (losses/prm.py) on TRL step rows. The head PRM has to
relearn at the separator what the LM already predicts one position early (a wrong result is a
token the SFT model did not expect); this read-out starts from that prediction.

``--sample`` writes step rows from the LM's own samples (temperature 1) labelled by the task's
checker up to the first wrong step (Math-Shepherd / PRM800K style labelling of policy samples):
training data on the mistakes the policy makes, and, from held-out prompts, a second held-out set.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
FLOOR = -3.0


def step_scores(lm, tokenizer, examples, rows):
    """(N,) step logits of a chunk of step examples, and their (N,) labels."""
    import torch

    from rlhfkit.data.steps import collate_steps

    b = collate_steps(examples, tokenizer.pad_token_id)
    logp = torch.log_softmax(lm(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float(), -1)
    token_logp = logp[:, :-1].gather(-1, b.input_ids[:, 1:, None])[..., 0]  # (B, T-1): log p(x_t) at t-1
    out = []
    for r, (e, row) in enumerate(zip(examples, rows)):
        lengths = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in row.data["completions"]]
        for p, n in zip(e.positions, lengths):  # the step's tokens are p-n .. p-1 (one separator token at p)
            out.append(token_logp[r, p - n - 1: p - 1].min())
    return torch.stack(out) - FLOOR, b.labels


def evaluate(lm, tokenizer, examples, rows) -> dict:
    import torch

    from rlhfkit.methods.prm import step_stats

    judged = []
    with torch.no_grad():
        for i in range(0, len(examples), 64):
            flat = (step_scores(lm, tokenizer, examples[i: i + 64], rows[i: i + 64])[0] > 0).tolist()
            for e in examples[i: i + 64]:
                judged.append(flat[: len(e.positions)])
                flat = flat[len(e.positions):]
    from prm_breakdown import table

    stats = step_stats(judged, [e.labels for e in examples])
    return {**{k: round(v, 3) for k, v in stats.items()}, "by_kind": table(rows, judged, examples)}


def sample_rows(lm, tokenizer, prompts_path: str, out: str, per_prompt: int, limit: int) -> None:
    import torch

    from rlhfkit.data.rows import read_rows
    from rlhfkit.tasks.arithmetic import verify_steps

    rows, written = read_rows(prompts_path)[:limit], 0
    with open(out, "w") as f, torch.no_grad():
        for i in range(0, len(rows), 64):
            prompts = [r.data["prompt"] for r in rows[i: i + 64] for _ in range(per_prompt)]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
            ids = lm.generate(**enc, max_new_tokens=40, do_sample=True, temperature=1.0,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for p, c in zip(prompts, ids[:, enc.input_ids.shape[1]:]):
                text = tokenizer.decode(c, skip_special_tokens=True)
                steps, labels = [s for s in text.split("\n") if s.strip()], [s.correct for s in verify_steps(p, text)]
                if steps and len(steps) == len(labels):
                    end = labels.index(False) + 1 if False in labels else len(labels)
                    f.write(json.dumps({"prompt": p, "completions": steps[:end], "labels": labels[:end]}) + "\n")
                    written += 1
    print(f"{written} rows -> {out}")


def main() -> None:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from rlhfkit.data.rows import read_rows
    from rlhfkit.data.steps import encode_step_rows
    from rlhfkit.models.load import load_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("lm")
    ap.add_argument("files", nargs="*")
    ap.add_argument("--sample", action="store_true")
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--limit", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--extra-eval", default=None)
    ap.add_argument("--save", default=None)
    args = ap.parse_intermixed_args()
    torch.set_num_threads(1)
    torch.manual_seed(1)
    tokenizer, lm = load_tokenizer(args.lm, None), AutoModelForCausalLM.from_pretrained(args.lm)
    if args.sample:
        return sample_rows(lm.eval(), tokenizer, args.files[0], args.files[1], args.per_prompt, args.limit)
    sets = {"eval": args.files[1], **({"extra_eval": args.extra_eval} if args.extra_eval else {})}
    held = {k: (read_rows(p), encode_step_rows(read_rows(p), tokenizer, "\n", 64)[0]) for k, p in sets.items()}
    train_rows = read_rows(args.files[0])
    train, _ = encode_step_rows(train_rows, tokenizer, "\n", 64)
    for name, (rows, examples) in held.items():
        print(json.dumps({"at_step": 0, "set": name, **evaluate(lm.eval(), tokenizer, examples, rows)}))
    optimizer = torch.optim.AdamW(lm.parameters(), lr=args.lr, betas=(0.9, 0.95))
    rng, start = random.Random(0), time.time()
    lm.train()
    for _ in range(args.steps):
        idx = rng.sample(range(len(train)), 32)
        logits, labels = step_scores(lm, tokenizer, [train[i] for i in idx], [train_rows[i] for i in idx])
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
    seconds = round(time.time() - start, 1)
    for name, (rows, examples) in held.items():
        print(json.dumps({"at_step": args.steps, "train_seconds": seconds, "set": name,
                          **evaluate(lm.eval(), tokenizer, examples, rows)}))
    if args.save:
        lm.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)


if __name__ == "__main__":
    main()
