"""Measuring maedet: the workloads behind ``tools/benchmark.py`` (the library's own training
and inference steps on fixed inputs), the data pipeline and DDP probes, and the
side-by-side comparison with detectron2's ViTDet when it is installed."""
