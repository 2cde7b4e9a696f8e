"""Compatibility path: what ``rehyat.training.data`` held before it was split by job. Import from the modules:

* :mod:`rehyat.training.dataset`: the latent dataset format (``dataset.json``, ``metadata.jsonl``, samples), its
  reader (:func:`~rehyat.training.dataset.load_dataset`, :class:`~rehyat.training.dataset.LatentDataset`) and
  writer (:class:`~rehyat.training.dataset.DatasetWriter`);
* :mod:`rehyat.training.sampler`: the data order, :class:`~rehyat.training.sampler.GlobalBatchSampler`;
* :mod:`rehyat.training.text_tables`: :func:`~rehyat.training.text_tables.encode_text_table` (the table class is
  :class:`rehyat.text_encoder.TextEmbeddingTable`);
* :mod:`rehyat.training.videos`: reading a videofolder's videos as tensors;
* :mod:`rehyat.training.prepare`: :func:`~rehyat.training.prepare.prepare_dataset` (``rehyat prepare-data``).

Every name this module had is re-exported here (the private ones too), so old imports keep working.
"""

from ..text_encoder import TextEmbeddingTable  # noqa: F401  (its path before it moved down a floor)
from .dataset import (  # noqa: F401
    _DTYPES,
    DATASET_CONFIG,
    FORMAT,
    LATENT_SPACES,
    METADATA_FILE,
    NULL_EMBEDS_FILE,
    DatasetInfo,
    DatasetWriter,
    LatentDataset,
    _check_sample,
    check_dataset_fits_model,
    load_dataset,
    prepare_output_folder,
    read_dataset_info,
    read_metadata,
)
from .prepare import (  # noqa: F401
    _check_geometry,
    _check_prepare_args,
    _check_videos_and_captions,
    _dataset_info,
    _DatasetSource,
    _video_encoder,
    _write_samples,
    prepare_dataset,
)
from .sampler import GlobalBatchSampler  # noqa: F401
from .text_tables import _text_encoder_name, encode_text_table  # noqa: F401
from .videos import read_video_file as _read_video  # noqa: F401
from .videos import video_tensor as _video_tensor  # noqa: F401

__all__ = [
    "DATASET_CONFIG",
    "METADATA_FILE",
    "NULL_EMBEDS_FILE",
    "DatasetInfo",
    "LatentDataset",
    "DatasetWriter",
    "GlobalBatchSampler",
    "TextEmbeddingTable",
    "read_dataset_info",
    "read_metadata",
    "load_dataset",
    "check_dataset_fits_model",
    "encode_text_table",
    "prepare_dataset",
]
