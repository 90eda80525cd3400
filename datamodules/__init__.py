"""LightningDataModules yielding dicts in the sample format of DESIGN.md."""

from datamodules.cifar100 import CIFAR100DataModule
from datamodules.coco import COCODataModule
from datamodules.cub import CUBDataModule
from datamodules.image_folder import ImageFolderDataModule
from datamodules.imagenet import ImageNetDataModule
from datamodules.quad_grid import QuadGridDataModule
from datamodules.quad_grid_dataset import QuadGridDataset
from datamodules.shapes import ShapesDataModule
from datamodules.stanford_cars import StanfordCarsDataModule

__all__ = [
    "CIFAR100DataModule",
    "COCODataModule",
    "CUBDataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "QuadGridDataModule",
    "QuadGridDataset",
    "ShapesDataModule",
    "StanfordCarsDataModule",
]
