"""TRL's RewardTrainer on the work of `run.py rm`: 16 (chosen, rejected) pairs a step, the
Bradley-Terry loss, a fresh score head on the base model. Run it in TRL's environment
(trl_common.py); `compare.py rm` runs both."""

from trl_common import report, rows, setup  # first: it sets the threads before torch loads

# isort: split
import datasets
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer


def main() -> None:
    args, paths, tokenizer, timer, common = setup("rm")
    data = rows(paths, "prefs.jsonl", 16 * (args.steps + args.warmup + args.profile))
    dataset = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in data])
    model = AutoModelForSequenceClassification.from_pretrained(paths["model"], num_labels=1,
                                                               pad_token_id=tokenizer.pad_token_id)
    config = RewardConfig(**common, per_device_train_batch_size=16, max_length=args.max_length)
    RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                  callbacks=[timer]).train()
    report("rm", args, timer)


if __name__ == "__main__":
    main()
