"""Datasets and loaders: images (MNIST, Fashion-MNIST) and crystals (CDVAE-format CSVs).

    from engine.data import build_image_data, load_images, DatasetError
    from engine.data.crystals import build_crystal_data
"""

from engine.data.images import (
    IMAGE_DATASETS,
    DataBundle,
    DatasetError,
    TensorLoader,
    build_image_data,
    default_data_dir,
    load_images,
    split_train_val,
)

__all__ = [
    "IMAGE_DATASETS", "DataBundle", "DatasetError", "TensorLoader", "build_image_data",
    "default_data_dir", "load_images", "split_train_val",
]
