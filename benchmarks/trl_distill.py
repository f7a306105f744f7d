"""TRL's DistillationTrainer on the work of `run.py distill`: 32 prompts, one answer each of at most
16 new tokens (temperature 1, no top-k/top-p), the reverse KL (beta 1, TRL's default) to a frozen
teacher of the same size (run.py's ``teacher_folder``) over every answer token. Run it in TRL's
environment (trl_common.py); `compare.py distill` runs both."""

from trl_common import report, rows, setup  # first: it sets the threads before torch loads

# isort: split
import datasets
import run
from transformers import AutoModelForCausalLM
from trl import DistillationConfig, DistillationTrainer


def main() -> None:
    args, paths, tokenizer, timer, common = setup("distill")
    data = rows(paths, "prompts.jsonl", 32 * (args.steps + args.warmup + args.profile))
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in data])
    config = DistillationConfig(**common, per_device_train_batch_size=32, max_completion_length=16, temperature=1.0,
                                top_p=1.0, top_k=0, beta=1.0, shuffle_dataset=False)
    teacher = AutoModelForCausalLM.from_pretrained(run.teacher_folder(paths))
    DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(paths["model"]), teacher_model=teacher, args=config,
                        train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]).train()
    report("distill", args, timer)


if __name__ == "__main__":
    main()
