from .io import atomic_save, load_checkpoint_file  # noqa: F401
