"""TRL's SFTTrainer on the work of `run.py sft`: 16 prompt+completion sequences a step, loss on the
completion, no packing. Run it in TRL's environment (trl_common.py); `compare.py sft` runs both."""

from trl_common import report, rows, setup  # first: it sets the threads before torch loads

# isort: split
import datasets
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer


def main() -> None:
    args, paths, tokenizer, timer, common = setup("sft")
    data = rows(paths, "sft.jsonl", 16 * (args.steps + args.warmup + args.profile))
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in data])
    config = SFTConfig(**common, per_device_train_batch_size=16, max_length=args.max_length, packing=False)
    SFTTrainer(model=AutoModelForCausalLM.from_pretrained(paths["model"]), args=config, train_dataset=dataset,
               processing_class=tokenizer, callbacks=[timer]).train()
    report("sft", args, timer)


if __name__ == "__main__":
    main()
