"""The demo pool: tiny checkpoints that trade three synthetic skills off against each other,
their lm-eval tasks and a ready recipe, built offline in minutes, in one of several designs
(DESIGNS: forgetting, experts, trajectory, dominant, broken, close, qwen2).

`mergekit-recycle demo-pool DIR [--design NAME]` builds it; `build_pool(DIR, seed=0,
size="default", design="experts")` is the same from Python. `write_generative_tasks(DIR / "tasks")`
adds generate_until (exact_match) twins of the skills' tasks to a built pool.
"""

from mergekit_recycle.demo_pool.build import (
    BASE_NAME,
    DEFAULT_DESIGN,
    DESIGN_PLAN,
    DESIGNS,
    MANIFEST,
    PLANS,
    SIZES,
    PoolPlan,
    PoolSummary,
    build_pool,
    plan_for,
    plan_recipe,
    read_summary,
    recipe_text,
    summary_table,
)
from mergekit_recycle.demo_pool.model import (ARCHITECTURES, char_tokenizer, save_checkpoint, tiny_causal_lm, tiny_llama,
                                             tiny_model)
from mergekit_recycle.demo_pool.skills import SKILLS, make_examples
from mergekit_recycle.demo_pool.tasks import (SkillTasks, evaluation_examples, generative_skill_tasks, skill_tasks,
                                             write_generative_tasks, write_tasks)
from mergekit_recycle.demo_pool.training import TrainingRun

__all__ = [
    "ARCHITECTURES", "BASE_NAME", "DEFAULT_DESIGN", "DESIGN_PLAN", "DESIGNS", "MANIFEST", "PLANS", "SIZES", "PoolPlan",
    "PoolSummary", "SKILLS", "SkillTasks", "TrainingRun", "build_pool", "evaluation_examples", "generative_skill_tasks",
    "plan_for", "plan_recipe",
    "char_tokenizer", "make_examples", "read_summary", "recipe_text", "save_checkpoint", "skill_tasks", "summary_table",
    "tiny_causal_lm", "tiny_llama",
    "tiny_model", "write_generative_tasks", "write_tasks",
]
