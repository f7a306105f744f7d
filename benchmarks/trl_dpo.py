"""TRL's DPOTrainer on the work of `run.py dpo`: 16 pairs a step, beta 0.1, the sigmoid loss, the
reference a frozen copy of the policy forwarded every step (TRL's default; `run.py dpo
--dpo-reference forward` is the like-for-like figure). Run it in TRL's environment
(trl_common.py); `compare.py dpo` runs both."""

from trl_common import report, rows, setup  # first: it sets the threads before torch loads

# isort: split
import datasets
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer


def main() -> None:
    args, paths, tokenizer, timer, common = setup("dpo")
    data = rows(paths, "prefs.jsonl", 16 * (args.steps + args.warmup + args.profile))
    dataset = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in data])
    config = DPOConfig(**common, per_device_train_batch_size=16, beta=0.1, loss_type=["sigmoid"],
                       max_length=args.max_length, precompute_ref_log_probs=False)
    DPOTrainer(model=AutoModelForCausalLM.from_pretrained(paths["model"]), ref_model=None, args=config,
               train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]).train()
    report("dpo", args, timer, {"reference": "forwarded every step"})


if __name__ == "__main__":
    main()
