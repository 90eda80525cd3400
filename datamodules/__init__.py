"""LightningDataModules yielding dicts in the sample format of DESIGN.md."""

from datamodules.shapes import ShapesDataModule

__all__ = ["ShapesDataModule"]
