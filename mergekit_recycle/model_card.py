"""The model card of a published merge: Hub metadata a search engine and the Hub UI read, and
a body a person reads (the weights and where each checkpoint came from, the baselines, the
plots, the recipe, and how to rebuild the merge)."""

from typing import Any, Dict, List, Optional

from mergekit_recycle.checkpoints import Checkpoint
from mergekit_recycle.records import RunRecord
from mergekit_recycle.report import BASELINE_KINDS, USED_WEIGHT, holdout_paragraphs, table

TAGS = ["merge", "mergekit", "mergekit-recycle"]
PAPER = "https://arxiv.org/abs/2412.04144"


def hub_repos(checkpoints: List[Checkpoint]) -> List[str]:
    """The Hub repos a merge was built from, once each, in pool order (local folders have none)."""
    return list(dict.fromkeys(c.repo for c in checkpoints if c.repo))


def build_model_card(report: Dict[str, Any], run: RunRecord, recipe_text: str, repo_id: str):
    """A huggingface_hub ModelCard for the winner of a run (report.json and the journal's run record)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    checkpoints = [Checkpoint.model_validate(c) for c in run.checkpoints]
    base = Checkpoint.model_validate(run.base) if run.base else None
    merged = [c for c in checkpoints if report["winner"]["weights"][c.name] > 0]
    repos = hub_repos(merged + ([base] if base else []))
    model_name = repo_id.split("/")[-1]
    optimized = next((row for row in report["rows"] if row["kind"] == "optimized"), None)
    results = []
    if optimized and optimized["holdout"]:
        results = [EvalResult(task_type="text-generation", dataset_type=task["holdout"],
                              dataset_name=f"{task['holdout']} (held out)", metric_type=task["metric"].split(",")[0],
                              metric_name=task["metric"], metric_value=round(optimized["holdout"][task["name"]], 4))
                   for task in run.tasks]
    data = ModelCardData(
        base_model=repos or None,
        base_model_relation="merge" if repos else None,
        tags=list(TAGS),
        library_name="transformers",
        pipeline_tag="text-generation",
        model_name=model_name if results else None,
        eval_results=results or None,
    )
    body = _body(report, checkpoints, base, recipe_text, model_name)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _body(report: Dict[str, Any], checkpoints: List[Checkpoint], base: Optional[Checkpoint], recipe_text: str,
          model_name: str) -> str:
    winner = report["winner"]
    used = winner["weights_above_1pct"]
    formula = ("θ = θ_base + scale · Σ wᵢ (θᵢ − θ_base)" if base else "θ = Σ wᵢ θᵢ") + ", wᵢ ≥ 0, Σ wᵢ = 1"
    method = (f"mergekit-recycle, a plugin for [mergekit](https://github.com/arcee-ai/mergekit), searched linear merges "
              f"of {len(checkpoints)} checkpoints ({formula}) with CMA-ES on a weighted mean of task scores (the method "
              f"of Khalifa et al. 2024, [If You Can't Use Them, Recycle Them]({PAPER}))")
    if winner.get("kind") in BASELINE_KINDS:
        # The selection kept a baseline: the card says so rather than present it as what the search found.
        kept = (f"the pool checkpoint **{winner['from']}**, unchanged" if winner["kind"] == "checkpoint"
                else f"the **{winner['from']}** of the pool (equal weights over the checkpoints it holds)")
        what = f"This model is {kept}: {method}, and no merge it found beat this one clearly on documents the search never saw."
    else:
        what = (f"This model is a linear merge of {len(checkpoints)} checkpoints ({formula}), its weights found by "
                f"mergekit-recycle, a plugin for [mergekit](https://github.com/arcee-ai/mergekit), with CMA-ES on a "
                f"weighted mean of task scores (the method of Khalifa et al. 2024, [If You Can't Use Them, Recycle "
                f"Them]({PAPER})).")
    lines = [
        f"# {model_name}",
        "",
        f"{what} {used} of {len(checkpoints)} checkpoints carry more than {USED_WEIGHT:.0%} of the weight.",
        "",
        "## Weights",
        "",
        "| checkpoint | source (repo@revision@sha) | weight |",
        "|---|---|---|",
    ]
    for checkpoint in sorted(checkpoints, key=lambda c: -winner["weights"][c.name]):
        lines.append(f"| {checkpoint.name} | `{checkpoint.published_source}` | {winner['weights'][checkpoint.name]:.4f} |")
    if base:
        lines += ["", f"Anchor (`base_model`): `{base.published_source}`, scale {winner['scale']:.4f}."]
    lines += ["", "## Results", "",
              "Scores of the merge and of the baselines, on the tasks the search optimized (search) and on "
              "held-out tasks it never saw (holdout). The baselines are every single checkpoint, the uniform soup "
              "and the greedy soup (Wortsman et al. 2022).", "", table(report), ""]
    if report.get("comparison"):
        # The words follow the intervals: a margin whose 95% interval holds 0 reads "no better than".
        lines += ["\n\n".join(holdout_paragraphs(report)), ""]
    budget = f" of a budget of {report['budget']}" if report.get("budget") else ""
    lines += ["## Search", "",
              f"{report['evaluations']} candidate merges evaluated{budget} ({report['failed']} failed); "
              f"the winner is {winner['from']}."
              + (" The search was stopped early by its time budget." if report.get("stopped_early") else ""),
              "", "![objective over the search](progress.png)", "", "![scores per task](tasks.png)", "",
              "![weights of the winner](weights.png)", "",
              "The full journal of the search is in `recycle/journal.jsonl` (JSON Lines, one record an evaluation), CMA-ES's state in `recycle/search.json`, and the report in `recycle/report.json`.",
              "", "## Recipe", "", "```yaml", recipe_text.rstrip(), "```", "",
              "## Reproduce", "",
              "`mergekit_config.yml` names every checkpoint by its pinned commit. Rebuild this merge with:", "",
              "```bash", "pip install mergekit-recycle", "mergekit-recycle merge mergekit_config.yml out/", "```", ""]
    local = [c.name for c in checkpoints + ([base] if base else []) if not c.repo]
    if local:
        lines += [f"Not on the Hub (local folders of the run, not reproducible elsewhere): {', '.join(local)}.", ""]
    return "\n".join(lines)
