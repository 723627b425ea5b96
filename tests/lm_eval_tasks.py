"""lmlab's few-shot items written as an lm-eval multiple-choice task, for the parity tests."""

import json


def harness_task(tmp_path, name, items):
    """Our prompts as an lm-eval multiple-choice task (fields used verbatim, no templating)."""
    data = tmp_path / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps({"context": it["prompt"], "choices": it["choices"], "gold": it["gold"]})
                              for it in items) + "\n")
    (tmp_path / "tasks").mkdir(exist_ok=True)
    (tmp_path / "tasks" / f"{name}.yaml").write_text(f"""
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {tmp_path / "hf_cache"}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)  # skip indexing 10k+ YAMLs
