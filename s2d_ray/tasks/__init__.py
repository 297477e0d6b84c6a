"""Registry of tasks. A task config's `name` picks the task; the config *is* the task."""

from s2d_ray.tasks.base import SPLITS, Example, Task
from s2d_ray.tasks.last_letter import LastLetter

# With more tasks this becomes Annotated[A | B | ..., Field(discriminator="name")].
TaskConfig = LastLetter

__all__ = ["SPLITS", "Example", "Task", "TaskConfig", "LastLetter"]
