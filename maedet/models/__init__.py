from .mae import MaskedAutoencoderViT, MAE_MODELS  # noqa
