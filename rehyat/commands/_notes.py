"""What the commands can tell about a model folder from its configs alone (no weights loaded)."""

from __future__ import annotations


def _settings(folder):
    """``(ReHyAt settings or None, num_layers)`` of a model folder (a path or a ModelFolder, whose configs are read
    once)."""
    from ..models.wan import ReHyAtConfig
    from ..pipelines.folders import ModelFolder

    tcfg = ModelFolder.of(folder).transformer_config
    settings = None if tcfg["rehyat"] is None else ReHyAtConfig.from_dict(tcfg["rehyat"])
    return settings, int(tcfg.get("num_layers", 0))


def folder_recurrence_problem(folder) -> str | None:
    """Why the ReHyAt model in ``folder`` cannot generate chunk by chunk (recurrent / streaming), or ``None`` when it
    can or the folder holds no ReHyAt model (see :meth:`ReHyAtConfig.recurrence_problem`). Reads configs only."""
    settings, num_layers = _settings(folder)
    return None if settings is None else settings.recurrence_problem(num_layers)


def folder_runner_chunk(folder) -> int | None:
    """Latent frames per recurrent runner chunk of the ReHyAt model in ``folder``
    (:meth:`ReHyAtConfig.runner_chunk_frames`), or ``None`` for a plain Wan transformer. Reads configs only."""
    settings, _ = _settings(folder)
    return None if settings is None else settings.runner_chunk_frames()


def recurrence_note(folder) -> str | None:
    """One line saying why the ReHyAt model in ``folder`` cannot generate recurrently or in streaming mode, or
    ``None`` when it can (or the folder holds no ReHyAt model). Reads configs only, no weights."""
    problem = folder_recurrence_problem(folder)
    if problem is None:
        return None
    return f"note: this model generates in parallel mode only, not recurrent / streaming: {problem}"
