"""The demo pool: tiny Llama checkpoints that trade three synthetic skills off against
each other, their lm-eval tasks and a ready recipe, built offline in minutes.

`mergekit-recycle demo-pool DIR` builds it; `build_pool` is the same from Python.
"""

from mergekit_recycle.demo_pool.build import (
    BASE_NAME,
    MANIFEST,
    PLANS,
    SIZES,
    PoolPlan,
    PoolSummary,
    build_pool,
    plan_recipe,
    read_summary,
    recipe_text,
    summary_table,
)
from mergekit_recycle.demo_pool.model import char_tokenizer, save_checkpoint, tiny_llama
from mergekit_recycle.demo_pool.skills import SKILLS, make_examples
from mergekit_recycle.demo_pool.tasks import SkillTasks, evaluation_examples, write_tasks

__all__ = [
    "BASE_NAME", "MANIFEST", "PLANS", "SIZES", "PoolPlan", "PoolSummary", "SKILLS", "SkillTasks",
    "build_pool", "evaluation_examples", "plan_recipe", "char_tokenizer", "make_examples", "read_summary", "recipe_text", "save_checkpoint",
    "summary_table", "tiny_llama", "write_tasks",
]
