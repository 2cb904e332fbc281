"""lm_eval tasks scored on one rank's share of their documents, as sums that add up across ranks.

lm_eval's own evaluator gathers every document's metric on rank zero and aggregates there (through accelerate's
collectives); training already has a process group and a strategy that reduces tensors, so each rank here keeps
only two numbers per metric: (sum of the documents' values, their weight). Rank r takes documents r, r + W, ...
(lm_eval's own split), the sums of all ranks are added, and the metric is computed from the totals, so that any
number of ranks gives the numbers of one. Each document's values come from the task itself
(`Task.process_results`: acc and acc_norm of a multiple choice, (log-likelihood, words or bytes) of a perplexity
task), so only the aggregation is ours; the ones a sum can carry:

- mean: (sum of values, number of documents)
- perplexity: exp(-mean log-likelihood), from (sum of log-likelihoods, number of documents)
- weighted_perplexity: exp(-sum ll / sum weights) (word and byte perplexity), from (sum ll, sum of weights)
- bits_per_byte: -sum ll / sum bytes / ln 2, from (sum ll, sum bytes)

Other aggregations (a median, a corpus BLEU, an F1 over all documents) and groups of tasks are refused by name:
python -m llmtrain.evaluate runs them after training.
"""

from __future__ import annotations

import math
from collections import defaultdict

from lm_eval.api.model import LM
from lm_eval.api.task import Task
from lm_eval.evaluator_utils import get_sample_size

REDUCIBLE = ("mean", "perplexity", "weighted_perplexity", "bits_per_byte")
Sums = dict[str, tuple[float, float]]  # "<task>/<metric>" -> (sum of values, sum of weights)


def unreducible(items: list, key: str = "eval.tasks") -> list[str]:
    """A problem per loaded item (lm_eval Task or group) whose metrics cannot be summed across ranks."""
    problems = []
    for item in items:
        if not isinstance(item, Task):
            problems.append(f"{key}: {getattr(item, 'group_name', item)} is a group of tasks, which evaluation during "
                            "training does not run: name its tasks, or run it after training with python -m "
                            "llmtrain.evaluate")
            continue
        other = {m: f.__name__ for m, f in item.aggregation().items() if f.__name__ not in REDUCIBLE}
        if other:
            found = ", ".join(f"{m} ({a})" for m, a in other.items())
            problems.append(f"{key}: task {item.config.task} aggregates {found}, which evaluation during training "
                            f"cannot add up across ranks ({', '.join(REDUCIBLE)} only): run it after training with "
                            "python -m llmtrain.evaluate")
    return problems


def shard_sums(lm: LM, tasks: list[Task], limit: int | float | None, rank: int = 0, world_size: int = 1) -> Sums:
    """This rank's sums for each task's metrics over its share of the first `limit` documents (all: None; a number
    below 1: that share of them)."""
    sums: Sums = {}
    for task in tasks:
        n = get_sample_size(task, limit)
        task.build_all_requests(limit=n, rank=rank, world_size=world_size)
        by_type: dict[str, list] = defaultdict(list)
        for instance in task.instances:
            by_type[instance.request_type].append(instance)
        for request_type, instances in by_type.items():
            answers = getattr(lm, request_type)(instances, disable_tqdm=True)
            for instance, answer in zip(instances, answers, strict=True):
                instance.resps.append(answer)
        task.apply_filters()
        by_doc: dict[int, list] = defaultdict(list)
        for instance in task.instances:
            by_doc[instance.doc_id].append(instance)
        aggregation = {m: f.__name__ for m, f in task.aggregation().items()}
        totals = {m: [0.0, 0.0] for m in aggregation}
        for doc_id, doc in task.doc_iterator(rank=rank, limit=n, world_size=world_size):
            instances = sorted(by_doc[doc_id], key=lambda i: i.idx)
            for metric, value in task.process_results(doc, [i.filtered_resps["none"] for i in instances]).items():
                if metric in totals:
                    value, weight = value if isinstance(value, tuple) else (value, 1.0)
                    totals[metric][0] += float(value)
                    totals[metric][1] += float(weight)
        sums |= {f"{task.config.task}/{m}": (s, w) for m, (s, w) in totals.items()}
        task._instances = None  # the requests and answers of this evaluation: not kept until the next one
    return sums


def metrics_of(sums: Sums, aggregations: dict[str, str]) -> dict[str, float]:
    """Each metric from its totals over all ranks; `aggregations`: "<task>/<metric>" -> its aggregation's name."""
    out = {}
    for key, (total, weight) in sums.items():
        mean = total / weight if weight else math.nan
        how = aggregations[key]
        out[key] = mean if how == "mean" else -mean / math.log(2) if how == "bits_per_byte" else math.exp(-mean)
    return out


def chance_levels(tasks: list[Task], limit: int | float | None) -> dict[str, float]:
    """The accuracy of a uniform guess on each multiple-choice task's first `limit` documents (the mean of one over
    their number of choices): what an accuracy is read against."""
    levels = {}
    for task in tasks:
        if task.OUTPUT_TYPE == "multiple_choice":
            docs = list(task.eval_docs)[: get_sample_size(task, limit)]
            levels[task.config.task] = sum(1 / len(task.doc_to_choice(d)) for d in docs) / max(len(docs), 1)
    return levels


def aggregations_of(tasks: list[Task]) -> dict[str, str]:
    """"<task>/<metric>" -> the name of the aggregation its task gives it (mean, weighted_perplexity, ...)."""
    return {f"{t.config.task}/{m}": f.__name__ for t in tasks for m, f in t.aggregation().items()}
