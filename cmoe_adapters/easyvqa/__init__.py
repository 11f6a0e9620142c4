"""The embedded CPU demo's foundation: continual VQA on the easy-vqa data with a tiny LLaVA.

Everything here runs offline on a laptop CPU: the data ships with the `easy_vqa` package, the model
is built from config, and the pretrained base ships with the package (`shipped_base`) or is made
locally once (~2.5 min, `pretrained_base`) and then cached.
"""

from .collate import VQACollator, generate_answers
from .pretrain import pretrained_base, shipped_base
from .tasks import TASK_ORDER, load_task
from .tiny_llava import build_tiny_llava

__all__ = [
    "TASK_ORDER",
    "VQACollator",
    "build_tiny_llava",
    "generate_answers",
    "load_task",
    "pretrained_base",
    "shipped_base",
]
