"""Run by test_distributed.py under `torchrun --nproc-per-node 2` (gloo, CPU): fine-tune and distil in one launch."""

import sys

import torch
import torch.distributed as dist

from rehyat.training import distill, finetune


def main(student, dataset, teacher, prompts, out):
    torch.set_num_threads(1)
    finetune(f"{out}/ft", **FINETUNE, model=student, data=dataset)
    distill(teacher, f"{out}/distill", prompts=prompts, **DISTILL)
    dist.destroy_process_group()


FINETUNE = dict(steps=4, batch_size=4, lr=3e-3, text_dropout=0.25, checkpoint_every=4, log_every=1, eval_batches=1,
                progress=False)
DISTILL = dict(frames=4, height=4, width=4, chunk_frames=2, overlap_frames=1, sampling_steps=3, steps=4,
               batch_size=2, lr=1e-2, eval_trajectories=1, checkpoint_every=4, progress=False)

if __name__ == "__main__":
    main(*sys.argv[1:])
