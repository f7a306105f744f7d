"""Where a learned PRM is right and wrong on the multi-step task: held-out step accuracy by kind of step.

    python benchmarks/prm_breakdown.py PRM_FOLDER EVAL_JSONL [--lm CAUSAL_LM_FOLDER]

Kinds (issue #14): a right step at index 0/1/2; ``answer_copy`` (the answer line does not repeat the
previous result: a copy check); ``operand_copy@j`` (an operand miscopied, the arithmetic right: a
copy check against the prompt or the previous line); ``result_slip@j`` (the result wrong: an
arithmetic check). With ``--lm``, the same table for a reference judge that is no PRM: a step is
"right" when a causal LM's greedy next token agrees with every written token of it. It shows what
the LM's next-token predictions know that a head read at the separator may not.
"""

from __future__ import annotations

import argparse
import collections
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")


def step_kind(prompt: str, steps: list[str], index: int, right: bool) -> str:
    from rlhfkit.tasks.arithmetic import _STEP_RE

    if right:
        return f"right@{index}"
    if index == 2:
        return "answer_copy"
    m = _STEP_RE.search(steps[index])
    x, op, y, z = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    return f"operand_copy@{index}" if z == (x + y if op == "+" else x - y) else f"result_slip@{index}"


def prm_judgements(path: str, examples, pad_id: int) -> list[list[bool]]:
    import torch

    from rlhfkit.data.steps import collate_steps
    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.models.reward import load_process_reward_model, step_logits

    model = load_process_reward_model(path, load_tokenizer(path, None)).eval()
    judged = []
    with torch.no_grad():
        for i in range(0, len(examples), 64):
            chunk = examples[i: i + 64]
            b = collate_steps(chunk, pad_id)
            flat = (step_logits(model, b.input_ids, b.attention_mask, b.step_rows, b.step_cols) > 0).tolist()
            for e in chunk:
                judged.append(flat[: len(e.positions)])
                flat = flat[len(e.positions):]
    return judged


def lm_judgements(path: str, rows, examples, tokenizer) -> list[list[bool]]:
    """Greedy agreement: step j is judged right when the LM predicts each of its tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(path).eval()
    judged = []
    with torch.no_grad():
        for row, e in zip(rows, examples):
            predicted = lm(torch.tensor([e.input_ids])).logits[0].argmax(-1).tolist()
            lengths = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in row.data["completions"]]
            starts = [p - n for p, n in zip(e.positions, lengths)]  # one separator token after each step
            judged.append([all(predicted[t - 1] == e.input_ids[t] for t in range(s, p)) for s, p in
                           zip(starts, e.positions)])
    return judged


def table(rows, judged, examples) -> dict:
    counts = collections.defaultdict(lambda: [0, 0])
    for row, js, e in zip(rows, judged, examples):
        for i, (j, y) in enumerate(zip(js, e.labels)):
            k = step_kind(row.data["prompt"], row.data["completions"], i, y)
            counts[k][0] += int(j == y)
            counts[k][1] += 1
    return {k: {"accuracy": round(v[0] / v[1], 3), "n": v[1]} for k, v in sorted(counts.items())}


def main() -> None:
    import torch

    from rlhfkit.data.rows import read_rows
    from rlhfkit.data.steps import encode_step_rows
    from rlhfkit.methods.prm import step_stats
    from rlhfkit.models.load import load_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("prm")
    ap.add_argument("eval_data")
    ap.add_argument("--lm", default=None, help="a causal LM for the greedy-agreement reference")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.prm, None)
    rows = read_rows(args.eval_data)
    examples, _ = encode_step_rows(rows, tokenizer, "\n", 128, "error")
    judges = {"prm": prm_judgements(args.prm, examples, tokenizer.pad_token_id)}
    if args.lm:
        judges["lm_greedy_agreement"] = lm_judgements(args.lm, rows, examples, tokenizer)
    for name, judged in judges.items():
        stats = step_stats(judged, [e.labels for e in examples])
        print(json.dumps({"judge": name, **{k: round(v, 3) for k, v in stats.items()},
                          "by_kind": table(rows, judged, examples)}))


if __name__ == "__main__":
    main()
