"""TRL's RLOOTrainer on the work of `run.py rloo`: 8 prompts x 4 samples of at most 16 new tokens a
step, temperature 1, no top-k/top-p, the contains-answer reward, beta 0.05 (TRL's default: the KL in
the reward, a frozen reference), one update per batch. Run it in TRL's environment (trl_common.py);
`compare.py rloo` runs both."""

from trl_common import report, rows, setup  # first: it sets the threads before torch loads

# isort: split
import datasets
from transformers import AutoModelForCausalLM
from trl import RLOOConfig, RLOOTrainer

from rlhfkit.tasks.arithmetic import contains_answer  # TRL passes prompts=, completions=, answer=


def main() -> None:
    args, paths, tokenizer, timer, common = setup("rloo")
    data = rows(paths, "prompts.jsonl", 8 * (args.steps + args.warmup + args.profile))
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in data])
    config = RLOOConfig(**common, per_device_train_batch_size=32, num_generations=4, steps_per_generation=1,
                        max_completion_length=16, temperature=1.0, top_p=1.0, top_k=0, beta=0.05, num_iterations=1,
                        shuffle_dataset=False)
    RLOOTrainer(model=AutoModelForCausalLM.from_pretrained(paths["model"]), reward_funcs=[contains_answer],
                args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]).train()
    report("rloo", args, timer)


if __name__ == "__main__":
    main()
