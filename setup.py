# The package metadata lives in pyproject.toml; this file lets older tools install it too.
from setuptools import setup

setup()
