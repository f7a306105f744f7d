"""TRL's CPOTrainer (trl.experimental.cpo) on the work of `run.py cpo`: 16 pairs a step, no
reference model, TRL's defaults (the sigmoid loss, beta 0.1, cpo_alpha 1). Run it in TRL's
environment (trl_common.py); `compare.py cpo` runs both."""

from trl_common import report, rows, setup  # first: it sets the threads before torch loads

# isort: split
import datasets
from transformers import AutoModelForCausalLM
from trl.experimental.cpo import CPOConfig, CPOTrainer


def main() -> None:
    args, paths, tokenizer, timer, common = setup("cpo")
    data = rows(paths, "prefs.jsonl", 16 * (args.steps + args.warmup + args.profile))
    config = CPOConfig(**common, per_device_train_batch_size=16, beta=0.1, loss_type="sigmoid", cpo_alpha=1.0,
                       max_length=args.max_length)
    CPOTrainer(model=AutoModelForCausalLM.from_pretrained(paths["model"]), args=config,
               train_dataset=datasets.Dataset.from_list(data), processing_class=tokenizer,
               callbacks=[timer]).train()
    report("cpo", args, timer, {"reference": "none"})


if __name__ == "__main__":
    main()
