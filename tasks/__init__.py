"""Built-in tasks, installed as `vitq.tasks` (pyproject.toml maps this folder) and declared in the
`vitq.tasks` entry-point group; importing a module registers its tasks with vitq.engine.tasks."""
from . import classification, coco  # noqa: F401  (registration side effects)
