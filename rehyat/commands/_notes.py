"""Notes the training commands print about the model folders they write."""

from __future__ import annotations


def recurrence_note(folder) -> str | None:
    """One line saying why the ReHyAt model in ``folder`` cannot generate recurrently or in streaming mode, or
    ``None`` when it can (or the folder holds no ReHyAt model). Reads configs only, no weights."""
    from ..io import read_json_object
    from ..models.wan import REHYAT_CONFIG_NAME, ReHyAtConfig, read_wan_config

    tdir, config = read_wan_config(folder)
    path = tdir / REHYAT_CONFIG_NAME
    if not path.exists():
        return None
    cfg = ReHyAtConfig.from_dict(read_json_object(path))
    if not cfg.causal:
        return ("note: this model uses bidirectional linear attention (causal=False): it generates in parallel mode "
                "only, not recurrent / streaming")
    kept = sorted(set(range(int(config.get("num_layers", 0)))) - set(cfg.blocks))
    if kept and cfg.softmax_blocks != "chunk_causal":
        return (f"note: blocks {kept} keep bidirectional softmax attention, so this model generates in parallel mode "
                "only (attention cost quadratic in the frames there); convert with --softmax-blocks chunk_causal "
                "for recurrent / streaming generation")
    return None
