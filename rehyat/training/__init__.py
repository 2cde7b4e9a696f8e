"""Training: the two-stage ReHyAt conversion recipe (design section 7) and training Wan transformers from scratch.

* Stage 1, attention distillation: :func:`distill` (``rehyat distill``), built on :class:`Distiller`,
  :func:`evaluate_blocks` and :class:`TeacherTrajectories`;
* block selection: :func:`convert_model` (``rehyat convert``): ranking (``best:N``) and the exact multiple-choice
  knapsack under an attention-FLOP budget (:func:`solve_mckp`, :func:`attention_flops`);
* stage 2, flow-matching fine-tuning (full or LoRA, optional teacher-velocity loss) and training from scratch:
  :func:`finetune` (``rehyat finetune``);
* data: the latent dataset format, reader and writer (:mod:`.dataset`), the data order (:mod:`.sampler`), the
  builder :func:`prepare_dataset` (``rehyat prepare-data``, :mod:`.prepare`), caption-embedding tables
  (:class:`TextEmbeddingTable`, :func:`encode_text_table` in :mod:`.text_tables`);
* infrastructure: atomic checkpoints with exact resume (:mod:`.checkpoint`), data parallelism under ``torchrun``
  (:mod:`.distributed`), progress bars and JSONL logs (:mod:`.progress`), Ctrl-C saving a resumable checkpoint
  (:mod:`.interrupt`, :class:`TrainingInterrupted`).

Importing this package is light; diffusers is imported when a function needs it.
"""

from ..text_encoder import TextEmbeddingTable
from .checkpoint import load_checkpoint, save_checkpoint
from .dataset import DatasetInfo, DatasetWriter, LatentDataset, check_dataset_fits_model, load_dataset, read_dataset_info
from .distill import (DistillResult, Distiller, attention_distill_loss, distill, evaluate_blocks,
                      prepare_for_distillation)
from .distributed import DistEnv, init_distributed
from .finetune import (
    FinetuneResult,
    add_lora,
    evaluate_flow_matching,
    finetune,
    flow_matching_inputs,
    merge_lora,
    sample_noise_levels,
)
from .interrupt import TrainingInterrupted
from .prepare import prepare_dataset
from .sampler import GlobalBatchSampler
from .selection import (
    Selection,
    attention_flops,
    brute_force_mckp,
    convert_model,
    parse_candidates,
    select_blocks_budget,
    solve_mckp,
)
from .text_tables import encode_text_table
from .trajectory import PromptPool, TeacherTrajectories, resolve_prompt_pool

__all__ = [
    "DatasetInfo", "DatasetWriter", "DistEnv", "DistillResult", "Distiller", "FinetuneResult", "GlobalBatchSampler",
    "LatentDataset", "PromptPool", "Selection", "TeacherTrajectories", "TextEmbeddingTable", "add_lora",
    "attention_distill_loss", "attention_flops", "brute_force_mckp", "check_dataset_fits_model", "convert_model",
    "distill", "encode_text_table", "evaluate_blocks", "evaluate_flow_matching", "finetune", "flow_matching_inputs",
    "init_distributed", "load_checkpoint", "load_dataset", "merge_lora", "parse_candidates", "prepare_dataset",
    "prepare_for_distillation", "read_dataset_info", "resolve_prompt_pool", "sample_noise_levels",
    "save_checkpoint", "select_blocks_budget", "solve_mckp", "TrainingInterrupted",
]
