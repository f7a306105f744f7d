"""TRL's KTOTrainer on the work of `run.py kto`: 16 pairs a step read as 32 unpaired answers (chosen
desirable, rejected not), beta 0.1, the reference a frozen copy forwarded every step (TRL's default),
TRL's KL completions (each answer after the previous row's prompt in its batch). Run it in TRL's
environment (trl_common.py); `compare.py kto` runs both."""

from trl_common import report, rows, setup  # first: it sets the threads before torch loads

# isort: split
import datasets
from transformers import AutoModelForCausalLM
from trl import KTOConfig, KTOTrainer


def main() -> None:
    args, paths, tokenizer, timer, common = setup("kto")
    data = rows(paths, "prefs.jsonl", 16 * (args.steps + args.warmup + args.profile))
    unpaired = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in data
                for k in ("chosen", "rejected")]
    config = KTOConfig(**common, per_device_train_batch_size=32, beta=0.1, max_length=args.max_length,
                       precompute_ref_log_probs=False)
    KTOTrainer(model=AutoModelForCausalLM.from_pretrained(paths["model"]), ref_model=None, args=config,
               train_dataset=datasets.Dataset.from_list(unpaired), processing_class=tokenizer,
               callbacks=[timer]).train()
    report("kto", args, timer, {"reference": "forwarded every step"})


if __name__ == "__main__":
    main()
