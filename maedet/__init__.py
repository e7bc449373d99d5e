"""maedet: masked-autoencoder pretraining and ViTDet Mask R-CNN on COCO-format data."""

__version__ = "0.2.0"
