"""Regional compilation of a Wan / ReHyAt transformer: every transformer block under ``torch.compile``."""

from __future__ import annotations

import torch


def compile_blocks(transformer, *, dynamic: bool = False, cache_size_limit: int = 64):
    """Put every block of ``transformer.blocks`` under ``torch.compile`` (``nn.Module.compile``, in place).

    Regional compilation, as diffusers recommends for DiTs: the blocks share one code object, so one compiled graph
    serves all of them (their weights are graph inputs): the first forward of the 30/30 Wan2.1-1.3B conversion took
    17-19 s on an H200, compilation included (benchmarks/results/h200_end_to_end_compiled_*.json). Converted
    (ReHyAt) and softmax blocks alike; outputs change only by floating-point reassociation (the compiled attention
    operator matched eager within 1.1e-5 relative on an H200, BENCHMARKS.md section 1; tests compare a compiled
    tiny model with eager on the CPU). Measured effect on an
    H200 at Wan2.1-1.3B geometry: one denoising forward of the 30/30 conversion 599 -> 301 ms at 81 frames and
    2,115 -> 1,143 ms at 321 frames (BENCHMARKS.md section 4); eager, the hybrid's many small element-wise passes
    cost about as much as the attention it saves. ``ReHyAtVideoPipeline.from_pretrained(compile="auto")`` and
    ``rehyat generate`` (``--compile auto``, their default) call it on a CUDA device (:func:`should_compile`).

    Parallel form (``mode="parallel"``): one graph per video length, the hybrid attention inside it. Chunk-by-chunk
    forms (recurrent, streaming): the recurrent attention step of a converted block is left out of the graph
    (``torch.compiler.disable`` on the processor's recurrent path, whose state changes every chunk and would
    otherwise recompile the block for every chunk position), so each block compiles to a few graphs around it
    that serve every chunk; the step itself is compiled separately (``rehyat_attention_step(..., compiled=True)``,
    whose graphs depend on the cached-token count, not on the chunk position: 2-3 graphs for a whole video when
    ``overlap_frames <= chunk_frames``, a few more while a longer overlap cache fills).

    Args:
        transformer: a diffusers ``WanTransformer3DModel`` (converted or not), on its final device and dtype.
        dynamic: passed to ``torch.compile`` (default ``False``: shapes are specialised, one graph per length).
        cache_size_limit: raises ``torch._dynamo.config.cache_size_limit`` (and ``recompile_limit``) to at least
            this many graphs per code object (default 64).

    Returns:
        The same ``transformer`` (its blocks are compiled in place; the first forward compiles).

    Raises:
        TypeError: ``transformer`` has no ``blocks`` (not a Wan transformer).
        ValueError: ``cache_size_limit`` < 1.
    """
    blocks = getattr(transformer, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise TypeError(f"transformer must be a WanTransformer3DModel with .blocks, got {type(transformer).__name__}")
    if not isinstance(cache_size_limit, int) or cache_size_limit < 1:
        raise ValueError(f"cache_size_limit must be an int >= 1, got {cache_size_limit!r}")
    from torch import _dynamo

    for key in ("cache_size_limit", "recompile_limit"):
        if hasattr(_dynamo.config, key):
            setattr(_dynamo.config, key, max(getattr(_dynamo.config, key), cache_size_limit))
    for block in blocks:
        block.compile(dynamic=dynamic)
    ctx = getattr(transformer, "_rehyat_context", None)
    if ctx is not None:  # a converted model: its recurrent attention step is compiled on its own (see above)
        ctx.compile_step = True
    return transformer


COMPILE_CHOICES = ("auto", "on", "off")


def check_compile(compile, *, arg: str = "compile") -> str:
    """``compile`` itself when it is one of :data:`COMPILE_CHOICES` (``"auto"``, ``"on"``, ``"off"``).

    Raises:
        ValueError: any other value, naming ``arg`` (the argument's name in the caller's words).
    """
    if not isinstance(compile, str) or compile not in COMPILE_CHOICES:
        raise ValueError(f"{arg} must be one of {', '.join(COMPILE_CHOICES)}, got {compile!r}")
    return compile


def should_compile(compile: str, device) -> bool:
    """Whether ``compile`` (:func:`check_compile`'s values) compiles a transformer on ``device`` (a
    ``torch.device`` or its string): ``"on"`` always, ``"off"`` never, ``"auto"`` on a CUDA device only, where it
    was measured to pay (see :func:`compile_blocks`); never measured on CPU or MPS, so ``"auto"`` stays eager there.

    Raises:
        ValueError: ``compile`` is not one of :data:`COMPILE_CHOICES`.
    """
    check_compile(compile)
    return compile == "on" or (compile == "auto" and torch.device(device).type == "cuda")
