"""TRL's ORPOTrainer (trl.experimental.orpo) on the work of `run.py orpo`: 16 pairs a step, no
reference model, beta 0.1 (TRL's default). Run it in TRL's environment (trl_common.py); `compare.py
orpo` runs both."""

from trl_common import report, rows, setup  # first: it sets the threads before torch loads

# isort: split
import datasets
from transformers import AutoModelForCausalLM
from trl.experimental.orpo import ORPOConfig, ORPOTrainer


def main() -> None:
    args, paths, tokenizer, timer, common = setup("orpo")
    data = rows(paths, "prefs.jsonl", 16 * (args.steps + args.warmup + args.profile))
    config = ORPOConfig(**common, per_device_train_batch_size=16, beta=0.1, max_length=args.max_length)
    ORPOTrainer(model=AutoModelForCausalLM.from_pretrained(paths["model"]), args=config,
                train_dataset=datasets.Dataset.from_list(data), processing_class=tokenizer,
                callbacks=[timer]).train()
    report("orpo", args, timer, {"reference": "none"})


if __name__ == "__main__":
    main()
