"""Registry of tasks. A task config's `name` picks the task; the config *is* the task."""

from typing import Annotated, Union

from pydantic import Field

from s2d_ray.tasks.base import SPLITS, Example, Task
from s2d_ray.tasks.coin_flip import CoinFlip
from s2d_ray.tasks.custom import UserTask
from s2d_ray.tasks.gsm8k import GSM8K
from s2d_ray.tasks.last_letter import LastLetter
from s2d_ray.tasks.pairwise import Pairwise
from s2d_ray.tasks.trivia_qa import TriviaQA

TASKS = (LastLetter, CoinFlip, TriviaQA, Pairwise, GSM8K, UserTask)
TaskConfig = Annotated[Union[TASKS], Field(discriminator="name")]

__all__ = ["SPLITS", "TASKS", "Example", "Task", "TaskConfig", "CoinFlip", "GSM8K", "LastLetter", "Pairwise", "TriviaQA", "UserTask"]
