"""TRL's OnlineDPOTrainer (trl.experimental.online_dpo) on the work of `run.py online_dpo`: 16
prompts a step, two answers each of at most 16 new tokens (temperature 1, no top-k/top-p), judged by
the contains-answer reward (the first answer chosen on a tie, as TRL does), DPO's sigmoid loss with
beta 0.1 against a frozen copy of the start model, one optimizer step a batch. Run it in TRL's
environment (trl_common.py); `compare.py online_dpo` runs both."""

from trl_common import report, rows, setup  # first: it sets the threads before torch loads

# isort: split
import datasets
from transformers import AutoModelForCausalLM
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

from rlhfkit.tasks.arithmetic import contains_answer  # TRL passes prompts=, completions=, answer=


def main() -> None:
    args, paths, tokenizer, timer, common = setup("online_dpo")
    data = rows(paths, "prompts.jsonl", 16 * (args.steps + args.warmup + args.profile))
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in data])
    config = OnlineDPOConfig(**common, per_device_train_batch_size=16, max_new_tokens=16, temperature=1.0, top_k=0,
                             top_p=1.0, beta=0.1, loss_type="sigmoid", max_length=args.max_length)
    OnlineDPOTrainer(model=AutoModelForCausalLM.from_pretrained(paths["model"]), reward_funcs=[contains_answer],
                     args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]).train()
    report("online_dpo", args, timer, {"prompts": 16, "answers_per_prompt": 2, "reference": "frozen copy"})


if __name__ == "__main__":
    main()
