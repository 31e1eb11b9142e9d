"""Built-in tasks; importing this package registers them with vitq.engine.tasks."""
from . import classification, coco  # noqa: F401  (registration side effects)
