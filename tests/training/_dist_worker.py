"""Run by test_distributed.py under `torchrun --nproc-per-node 2` (gloo, CPU): fine-tune and distil in one launch."""

import sys

import torch
import torch.distributed as dist

from rehyat.training import distill, finetune


def main(student, dataset, teacher, prompts, out):
    torch.set_num_threads(1)
    finetune(f"{out}/ft", **FINETUNE, model=student, data=dataset)
    distill(teacher, f"{out}/distill", prompts=prompts, **DISTILL)
    interrupted_finetune(student, dataset, out)
    dist.destroy_process_group()


def interrupted_finetune(student, dataset, out):
    """FINETUNE again, with Ctrl-C (SIGINT) reaching rank 1 alone inside its 2nd optimizer step and no checkpoint
    scheduled before the end; then resumed. Each rank writes where it stopped to ``ft_ctrl_c_rank<r>.json``."""
    import json
    import os
    import signal

    from rehyat.training import TrainingInterrupted

    rank, calls, original = dist.get_rank(), [0], torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        calls[0] += 1
        if rank == 1 and calls[0] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    torch.optim.AdamW.step = step
    kw = dict(FINETUNE, checkpoint_every=100, model=student, data=dataset)
    try:
        finetune(f"{out}/ft_ctrl_c", **kw)
        stopped = None
    except TrainingInterrupted as e:
        stopped = {"done": e.done, "saved_step": e.saved_step, "in_step": e.in_step}
    finally:
        torch.optim.AdamW.step = original
    with open(f"{out}/ft_ctrl_c_rank{rank}.json", "w") as f:
        json.dump(stopped, f)
    finetune(f"{out}/ft_ctrl_c", **kw, resume=True)


FINETUNE = dict(steps=4, batch_size=4, lr=3e-3, text_dropout=0.25, checkpoint_every=4, log_every=1, eval_batches=1,
                progress=False)
DISTILL = dict(frames=4, height=4, width=4, chunk_frames=2, overlap_frames=1, sampling_steps=3, steps=4,
               batch_size=2, lr=1e-2, eval_trajectories=1, checkpoint_every=4, progress=False)

if __name__ == "__main__":
    main(*sys.argv[1:])
