from setuptools import find_packages, setup

setup(
    name="maedet",
    version="0.1.0",
    description="Masked-autoencoder pretraining and ViTDet Mask R-CNN instance segmentation",
    python_requires=">=3.10",
    packages=find_packages(include=["maedet", "maedet.*"]),
    install_requires=[
        "torch",
        "torchvision",
        "timm",
        "pycocotools",
        "fvcore",
        "opencv-python-headless",
        "omegaconf",
        "numpy",
        "tensorboard",
        "tqdm",
        "tabulate",
    ],
    extras_require={"dev": ["pytest"]},
)
