"""Records importance with the Trainer; run under torchrun (DDP, gloo) or as one process.

    torchrun --nproc_per_node 2 tests/ddp_record.py OUT   # per-device batch 2: global batch 4
    python tests/ddp_record.py OUT                        # one process, batch 4
Both see the same global batches (a sequential sampler) and write OUT/rank{r}.safetensors;
the callback's own file (OUT/importance.safetensors) must be written by rank 0 only.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from transformers import Trainer, TrainingArguments  # noqa: E402

import hlora  # noqa: E402
from hlora.hf import ImportanceCallback  # noqa: E402

from tiny import TokenData, tiny_lora_model  # noqa: E402


class SequentialTrainer(Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def main(out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    saves = []
    original_save = hlora.Importance.save

    def counting_save(self, path, **kw):
        saves.append(path)
        return original_save(self, path, **kw)

    hlora.Importance.save = counting_save
    model = tiny_lora_model(seed=60)
    cb = ImportanceCallback(os.path.join(out, "importance.safetensors"), xi=1e-3)
    args = TrainingArguments(output_dir=os.path.join(out, "trainer"), max_steps=5,
                             per_device_train_batch_size=4 // world, learning_rate=5e-3, logging_steps=1,
                             save_strategy="no", report_to=[], seed=0, use_cpu=True, disable_tqdm=True,
                             max_grad_norm=1.0, dataloader_num_workers=0, ddp_backend="gloo" if world > 1 else None)
    SequentialTrainer(model=model, args=args, train_dataset=TokenData(64, seed=61), callbacks=[cb]).train()
    hlora.Importance.save = original_save
    cb.importance.save(os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"saves{rank}.json"), "w") as f:
        json.dump({"saves": saves, "world": world, "steps": cb.importance.meta["steps"]}, f)
    if torch.distributed.is_initialized():  # the Trainer leaves its group up: torn down together
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
