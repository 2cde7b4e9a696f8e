"""The eight conversion settings of ``rehyat distill`` and ``rehyat convert``, as one object.

:class:`ConversionSettings` holds what :func:`rehyat.convert_wan` takes besides the blocks (``chunk_frames``,
``overlap_frames``, ``causal``, ``stabilizer``, ``feature_map``, ``feature_map_kwargs``, ``feature_map_input``,
``softmax_blocks``); it is built from the commands' parsed arguments (:meth:`ConversionSettings.from_cli`) or from
a function's keyword arguments (:meth:`ConversionSettings.from_kwargs`), checked without a model
(:meth:`ConversionSettings.check`) and turned into the keyword dict (:meth:`ConversionSettings.to_kwargs`) that
the runs pass to ``convert_wan`` and save as ``"conversion"`` in ``train/run_config.json`` (compared on
``--resume``, so its keys and values stay as they are).

It leaves out :class:`rehyat.models.ReHyAtConfig`'s ``teacher_attention`` and ``linear_scale``: ``convert_wan``
works those out itself (e.g. for a block-causal teacher), so they are never passed explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields as dataclass_fields

__all__ = ["ConversionSettings", "CONVERSION_NAMES"]


@dataclass(frozen=True)
class ConversionSettings:
    """The conversion settings (see :func:`rehyat.convert_wan` and :class:`rehyat.models.ReHyAtConfig` for each);
    no defaults here: the commands' and functions' own defaults apply."""

    chunk_frames: int
    overlap_frames: int
    causal: bool
    stabilizer: str
    feature_map: str
    feature_map_kwargs: dict | None
    feature_map_input: str
    softmax_blocks: str

    @classmethod
    def from_cli(cls, args) -> "ConversionSettings":
        """From parsed arguments of :func:`rehyat.training.cli_args.add_conversion_args` (``--bidirectional``
        means ``causal=False``)."""
        return cls(chunk_frames=args.chunk_frames, overlap_frames=args.overlap_frames, causal=not args.bidirectional,
                   stabilizer=args.stabilizer, feature_map=args.feature_map,
                   feature_map_kwargs=args.feature_map_kwargs, feature_map_input=args.feature_map_input,
                   softmax_blocks=args.softmax_blocks)

    @classmethod
    def from_kwargs(cls, kwargs) -> "ConversionSettings":
        """From a mapping that holds the eight names (e.g. a function's keyword arguments; other keys ignored)."""
        return cls(**{name: kwargs[name] for name in CONVERSION_NAMES})

    def fields(self) -> dict:
        """The eight settings as given (not checked), e.g. to pass on as keyword arguments."""
        return {name: getattr(self, name) for name in CONVERSION_NAMES}

    def to_kwargs(self) -> dict:
        """The keyword arguments of :func:`rehyat.convert_wan` (also the ``"conversion"`` entry of
        ``run_config.json``): ``feature_map_kwargs`` becomes a dict (``{}`` for ``None``).

        Raises:
            ValueError: ``feature_map_kwargs`` is neither ``None`` nor a dict (naming ``--feature-map-kwargs``).
        """
        kw = self.feature_map_kwargs
        if kw is not None and not isinstance(kw, dict):
            raise ValueError(f"--feature-map-kwargs must be a JSON object like '{{\"feature_dim\": 64}}', got {kw!r}")
        return dict(self.fields(), feature_map_kwargs=dict(kw or {}))

    def check(self, head_dim: int = 8) -> None:
        """Check the settings without a model: builds one feature map (one head of ``head_dim``, the model's
        attention head size) from ``feature_map`` and ``feature_map_kwargs``.

        Raises:
            ValueError: a bad setting, naming its CLI argument (an unknown or bad ``--feature-map-kwargs`` key too).
        """
        from ..models.wan import FEATURE_MAP_INPUTS, SOFTMAX_BLOCKS
        from ..modules import make_feature_map
        from ..ops._checks import check_settings

        kw = self.to_kwargs()["feature_map_kwargs"]
        check_settings(frame_tokens=1, chunk_frames=self.chunk_frames, overlap_frames=self.overlap_frames,
                       stabilizer=self.stabilizer)
        if self.feature_map_input not in FEATURE_MAP_INPUTS:
            raise ValueError(f"feature_map_input must be one of {FEATURE_MAP_INPUTS}")
        if self.softmax_blocks not in SOFTMAX_BLOCKS:
            raise ValueError(f"--softmax-blocks must be one of {SOFTMAX_BLOCKS}")
        try:
            make_feature_map(self.feature_map, 1, head_dim, **kw)
        except (TypeError, ValueError) as e:  # TypeError: a keyword the feature map does not take
            raise ValueError(f"--feature-map {self.feature_map} --feature-map-kwargs {kw!r}: {e}") from None


#: the eight names, in the order of :func:`rehyat.training.distill`'s and :func:`rehyat.training.convert_model`'s
#: keyword arguments
CONVERSION_NAMES = tuple(f.name for f in dataclass_fields(ConversionSettings))
