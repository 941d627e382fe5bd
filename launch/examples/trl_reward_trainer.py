"""Fine-tunes a reward model exported by `convert --to_hf` with TRL's RewardTrainer.

  python launch/examples/trl_reward_trainer.py --model=hf/my_rm --output_dir=trl_out

The data set is TRL's conversational preference format (prompt / chosen / rejected messages); the
export's chat template renders each pair into the text the model was trained on. Replace `rows` by
`datasets.load_dataset(...)` of any TRL preference data set (conversational or standard).
"""
import argparse

import datasets
import torch
import transformers
import trl


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, help="a `convert --to_hf` directory")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--max_steps", type=int, default=10)
  args = parser.parse_args()
  tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(args.model, dtype=torch.float32)
  rows = [{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
           "chosen": [{"role": "assistant", "content": f" {2 * i}"}],
           "rejected": [{"role": "assistant", "content": f" {2 * i + 1}"}]} for i in range(16)]
  config = trl.RewardConfig(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=4,
                            learning_rate=1e-4, logging_steps=1, report_to="none", save_strategy="no",
                            use_cpu=not torch.cuda.is_available())
  trainer = trl.RewardTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                              processing_class=tokenizer)
  print("TRL's text of the first pair:", repr(tokenizer.decode(trainer.train_dataset[0]["chosen_ids"])))
  trainer.train()
  trainer.save_model(args.output_dir)


if __name__ == "__main__":
  main()
