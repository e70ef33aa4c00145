"""Data sets as LightningDataModules. ``DATASETS`` is the registry mirrored by ``conf/data/``.

Every module is built as ``DATASETS.build(name, **kwargs)``, knows ``data_shape``,
``num_classes`` and ``is_image`` right after construction, and yields batches ``(x, y)``: x
float32 ``[B, *data_shape]`` in model range, y int64 ``[B]``.

==========  ==================================================================  ===========
name        data                                                                shape
==========  ==================================================================  ===========
toy2d       swiss_roll, moons, 8gaussians, checkerboard, gmm (``dataset=``)     (2,)
digits      scikit-learn's 8×8 digits, shipped in the package (offline default)  (1, 8, 8)
digit_pairs two digits side by side with captions (text to image)                (1, 8, 16)
cifar10     local ``cifar-10-python.tar.gz`` / ``cifar-10-batches-py/``          (3, 32, 32)
folder      any folder of PNG/JPEG images                                       (C, S, S)
==========  ==================================================================  ===========
"""
from ..registry import DATASETS
from .datamodule import BaseDataModule, ImageDataModule
from .cifar10 import CIFAR10DataModule
from .digits import DigitsDataModule, load_digits
from .digit_pairs import DigitPairsDataModule
from .folder import FolderDataModule
from .toy2d import TOY_DATASETS, Toy2D, Toy2DDataModule, make_toy


__all__ = [
    "DATASETS",
    "BaseDataModule",
    "ImageDataModule",
    "Toy2DDataModule",
    "Toy2D",
    "TOY_DATASETS",
    "make_toy",
    "DigitsDataModule",
    "DigitPairsDataModule",
    "load_digits",
    "CIFAR10DataModule",
    "FolderDataModule",
]
