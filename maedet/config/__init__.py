from .loader import load_config, load_yaml_with_bases, save_config  # noqa: F401
from .schema import DetectionConfig, PretrainConfig  # noqa: F401
